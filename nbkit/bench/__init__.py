"""Benchmarks: closed_loop (`python -m nbkit bench`), loadtest (HTTP load), overhead (HTTP vs engine)."""
