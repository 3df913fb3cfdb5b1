"""Benchmarks: closed_loop (`python -m nbkit bench`), loadtest (HTTP load), overhead (HTTP vs engine)."""


def report_json(result: dict, out: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to `out` when given."""
    import json

    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
