"""Seconds from launching `nbkit serve` to its first healthy `GET /health`, over a few launches.

    python scripts/startup_time.py [--runs 3] [--fresh] [-- serve arguments...]

Each launch is a new process on a free port (what `make serve` runs: `python -m nbkit serve`), stopped once
healthy and once /info says its Medusa trees are priced (a first start calibrates while serving, in idle
time). --fresh empties the start-up cache before every launch (the first start on a machine); without it
the first launch fills the cache and the others reuse it. Prints one line per launch (seconds to healthy, the
CPU seconds the server used by then, seconds until trees were priced, the engine and calibration from /info)
and the median of the launches after the first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far: what its start costs on an idle
    machine, where wall time is about this (the start runs on one thread), whatever the load here."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def launch(serve_args: list[str], timeout: float) -> tuple[float, float, float, dict]:
    """Seconds from Popen to /health answering 200, the CPU seconds the server used by then, seconds from Popen
    until /info's calibration is no longer "measuring" (trees priced), and /info at that time."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", "--port", str(port), *serve_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        healthy = _until(proc, start, timeout, lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200)
        cpu = cpu_seconds(proc.pid)
        _until(proc, start, timeout, lambda: httpx.get(f"{url}/info", timeout=10).json()["calibration"] != "measuring")
        priced = time.perf_counter() - start
        return healthy, cpu, priced, httpx.get(f"{url}/info", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _until(proc: subprocess.Popen, start: float, timeout: float, ready) -> float:
    """Poll `ready()` until True; the seconds since `start` then."""
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"nbkit serve exited with {proc.returncode}")
        try:
            if ready():
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.05)
    raise TimeoutError(f"not ready within {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="empty the start-up cache before every launch")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("serve_args", nargs="*", help="after --: arguments for nbkit serve")
    args = parser.parse_args()
    from nbkit.engine.startcache import cache_root

    seconds = []
    for run in range(args.runs):
        if args.fresh:
            shutil.rmtree(cache_root(), ignore_errors=True)
        took, cpu, priced, info = launch(args.serve_args, args.timeout)
        seconds.append(took)
        check = info.get("self_check") or {}
        print(f"launch {run + 1}: healthy after {took:.1f} s ({cpu:.1f} CPU s), trees priced after {priced:.1f} s  "
              f"engine {info['engine']} "
              f"({info.get('mode')}), calibration {info.get('calibration')}, "
              f"self-check cached {check.get('cached')}", flush=True)
    rest = seconds[1:] or seconds
    print(f"median of launches {2 if len(seconds) > 1 else 1}-{len(seconds)}: {statistics.median(rest):.1f} s "
          f"({os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
