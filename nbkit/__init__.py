"""nbkit: serve Medusa models from a notebook (PyTorch and llama.cpp engines, FastAPI server)."""

__version__ = "0.1.0"
