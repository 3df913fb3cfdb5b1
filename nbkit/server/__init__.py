"""The HTTP layer: `app.create_app(engine, settings)` (FastAPI); `nbkit.launch.start_server` runs it."""
