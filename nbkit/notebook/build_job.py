"""The llama.cpp build as a background job, so a T4's long CUDA compile overlaps the download and conversion.

On Colab's 2 vCPUs the CUDA build of llama-cpp-python takes 10-60 minutes (colab.md), the vicuna-7b
download and conversion about as long again; one after the other they double the wait. `start_build()`
runs `python -m nbkit build ...` in a child process whose output goes to a log file, and returns a
`BuildJob` at once: its repr (the cell's output) shows the state, the stage, the compile progress and an
estimate; `wait()` blocks with progress lines until the bindings are installed, and raises `BuildError`
with the log's tail when the build failed. The child's exit status lands in a file next to the log, so a
job started by a kernel that was since restarted is found again (`start_build` attaches to it instead of
starting a second compile in the same folders).

The optional wheel cache (`WHEEL_CACHE="drive"` in the notebooks) keeps the built wheel on Google Drive,
keyed by `build.wheel_tag()`: the next session copies and installs it in seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..gguf import build
from ..gguf.build import BuildError

DRIVE_MOUNT = "/content/drive"
# Prior estimates before the compile reports progress. CPU: measured on this project's 2-core machines
# (llama-cpp.md). CUDA for one architecture on Colab's 2 vCPUs: 10-20 min reported by others (colab.md).
PRIOR_S = {"cpu": 4 * 60, "cuda": 15 * 60}
_PROGRESS = re.compile(r"\[(\d+)/(\d+)\]")
_STAGE = re.compile(r"\[nbkit build\] (.*)")
_jobs: dict[str, BuildJob] = {}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class BuildJob:
    """One background build (or the record that none was needed); see the module docstring."""

    flavour: str
    log_file: Path
    command: list[str] = field(default_factory=list)
    estimate_s: float = 0.0
    started: float = field(default_factory=time.time)
    proc: subprocess.Popen | None = None
    note: str = ""  # set when nothing had to run ("already installed")
    pid: int | None = None  # of a build an earlier kernel started (no Popen here)

    @property
    def rc_file(self) -> Path:
        return self.log_file.with_suffix(".rc")

    def returncode(self) -> int | None:
        """The child's exit status, None while it runs."""
        if self.note:
            return 0
        if self.proc is not None:
            self.proc.poll()  # reap our own child; the status itself comes from the file (attach-safe)
        try:
            text = self.rc_file.read_text().strip()
        except OSError:
            text = ""
        if text:
            return int(text)
        if self.proc is not None and self.proc.returncode is not None:
            return self.proc.returncode or 1  # exited without writing its status: killed
        if self.proc is None and self.pid is not None and not _pid_alive(self.pid):
            return -9  # an earlier kernel's build that died without writing its status
        return None

    @property
    def state(self) -> str:
        rc = self.returncode()
        return "running" if rc is None else "done" if rc == 0 else "failed"

    def tail(self, lines: int = 30) -> list[str]:
        try:
            with open(self.log_file, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
        except OSError:
            return []

    def progress(self) -> tuple[str, float | None]:
        """(the last stage the build announced, the compile's fraction done or None) from the log."""
        stage, frac = "starting", None
        for line in self.tail(200):
            if m := _STAGE.search(line):
                stage = m[1]
            for m in _PROGRESS.finditer(line):
                if int(m[2]) > 10:
                    frac = int(m[1]) / int(m[2])
        return stage, frac

    def remaining_s(self) -> float:
        """Seconds left: extrapolated from the compile's progress once it reports some, else the prior estimate."""
        elapsed = time.time() - self.started
        _, frac = self.progress()
        if frac is not None and frac >= 0.03:
            return elapsed * (1 - frac) / frac
        return max(self.estimate_s - elapsed, 0.0)

    def status_line(self) -> str:
        state, elapsed = self.state, time.time() - self.started
        if self.note:
            return f"llama.cpp ({self.flavour}): {self.note}"
        if state == "done":
            return f"llama.cpp ({self.flavour}): built and installed in {_minutes(elapsed)}"
        if state == "failed":
            return f"llama.cpp ({self.flavour}): FAILED (exit {self.returncode()}) after {_minutes(elapsed)}"
        stage, frac = self.progress()
        pct = f", {100 * frac:.0f}% compiled" if frac is not None else ""
        return (f"llama.cpp ({self.flavour}): building in the background for {_minutes(elapsed)}{pct}; "
                f"about {_minutes(self.remaining_s())} left (estimate) | {stage}")

    def __repr__(self) -> str:
        lines = [self.status_line()]
        if not self.note:
            lines.append(f"  log: {self.log_file}")
            if self.state == "running":
                last = next((line for line in reversed(self.tail(5)) if line.strip()), "")
                if last:
                    lines.append(f"  last: {last[:200]}")
                lines.append("  the model downloads and converts meanwhile; serving waits for the build")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise BuildError (with the log's tail) if the build failed."""
        if self.state == "failed":
            tail = "\n".join(self.tail(40))
            raise BuildError(f"the llama.cpp build failed (exit {self.returncode()}); full log: {self.log_file}\n"
                             f"command: {shlex.join(self.command)}\n{tail}")

    def wait(self, timeout: float | None = None, every_s: float = 60.0, poll_s: float = 1.0) -> BuildJob:
        """Block until the build is done, printing a status line now and then; BuildError if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = -every_s
        while self.state == "running":
            if time.monotonic() - last >= every_s:
                print(self.status_line(), flush=True)
                last = time.monotonic()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the llama.cpp build is still running after {timeout:.0f} s: {self.status_line()}")
            time.sleep(poll_s)
        self.check()
        if last >= 0:
            print(self.status_line(), flush=True)
        return self


# --- starting one ---------------------------------------------------------------------------------
def wheel_cache_dir(setting: str | os.PathLike | None, drive_root: str | os.PathLike | None = None) -> Path | None:
    """Where built wheels are kept across sessions: None (off), Google Drive ("drive"), or a folder.

    "drive" means `<MyDrive>/nbkit/wheels`; MyDrive is `drive_root`, else $NBKIT_DRIVE_DIR, else Colab's
    /content/drive/MyDrive, which is mounted first (Colab asks the user to allow it)."""
    if setting is None or str(setting).strip().lower() in ("", "none", "off", "no", "false"):
        return None
    if str(setting).strip().lower() != "drive":
        return Path(setting)
    root = Path(drive_root or os.environ.get("NBKIT_DRIVE_DIR") or f"{DRIVE_MOUNT}/MyDrive")
    if not root.is_dir():
        from .env import in_colab

        if not in_colab():
            raise BuildError(f'WHEEL_CACHE="drive" needs Google Drive (Colab) or $NBKIT_DRIVE_DIR; {root} is not '
                             'there. Use a folder path, or "none".')
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(DRIVE_MOUNT)
        if not root.is_dir():
            raise BuildError(f"Google Drive was mounted but {root} is not there")
    return root / "nbkit" / "wheels"


def build_command(cuda: bool, cuda_arch: str | None, cache: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "nbkit", "build"]
    if cuda:
        cmd += ["--cuda", "--cuda-arch", str(cuda_arch or build.detect_cuda_arch())]
    if cache is not None:
        cmd += ["--wheel-cache", str(cache)]
    return cmd


def _child_env() -> dict[str, str]:
    """The child imports the same nbkit as this kernel (in Colab only the kernel's sys.path has the checkout)."""
    checkout = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": checkout + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _attach(flavour: str, log_file: Path, estimate_s: float) -> BuildJob | None:
    """A job for a build that an earlier kernel started and that still runs (found by its pid file)."""
    pid_file = log_file.with_suffix(".pid")
    try:
        record = json.loads(pid_file.read_text())
        pid, started, cmd = int(record["pid"]), float(record["started"]), list(record["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    job = BuildJob(flavour, log_file, cmd, estimate_s, started, pid=pid)
    return job if job.returncode() is None else None


def start_build(cuda: bool = False, cuda_arch: str | None = None, cache: Path | None = None,
                command: list[str] | None = None) -> BuildJob:
    """Start the build in a child process (or return the one already running for this flavour).

    `command` replaces `python -m nbkit build ...` (tests use a script that sleeps and prints)."""
    flavour = build.flavour(cuda, cuda_arch)
    running = _jobs.get(flavour)
    estimate = PRIOR_S["cuda" if cuda else "cpu"] * 2 / max(min(os.cpu_count() or 2, 16), 1)
    log_dir = build.root() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"background-{flavour}.log"
    if running is not None and running.state == "running":
        return running
    if (attached := _attach(flavour, log_file, estimate)) is not None:
        _jobs[flavour] = attached
        return attached
    cmd = command or build_command(cuda, cuda_arch, cache)
    log_file.with_suffix(".rc").unlink(missing_ok=True)
    # The shell writes the exit status to a file, so a later kernel can read it without being the parent.
    wrapper = ["sh", "-c", '"$@"; echo $? > "$NBKIT_BUILD_RC"', "sh", *cmd]
    env = {**_child_env(), "NBKIT_BUILD_RC": str(log_file.with_suffix(".rc"))}
    with open(log_file, "w") as log:
        proc = subprocess.Popen(wrapper, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    job = BuildJob(flavour, log_file, cmd, estimate, time.time(), proc)
    log_file.with_suffix(".pid").write_text(json.dumps({"pid": proc.pid, "started": job.started, "command": cmd}))
    _jobs[flavour] = job
    return job


def ensure_engine(plan, env=None, wheel_cache: str | os.PathLike | None = None, background: bool = True,
                  command: list[str] | None = None, drive_root: str | os.PathLike | None = None) -> BuildJob | None:
    """Get llama.cpp for the plan: None for the torch engine, else a BuildJob (already done when installed).

    The source (which also holds the GGUF converter) is fetched here, in the cell; the compile runs in the
    background unless `background=False`. `wheel_cache`: None, "drive" or a folder (see wheel_cache_dir)."""
    if plan.engine != "llamacpp":
        print(f"engine {plan.engine}: nothing to build")
        return None
    from .env import detect

    gpu = (env or detect()).gpu
    cuda = gpu is not None and not getattr(gpu, "simulated", False)  # $NBKIT_GPU plans for a GPU, builds for the CPU
    arch = gpu.arch if cuda else None
    flavour = build.flavour(cuda, arch)
    log_file = build.root() / "logs" / f"background-{flavour}.log"
    if command is None and build.installed_bindings() == (build.BINDINGS, cuda):
        return BuildJob(flavour, log_file, note=f"llama-cpp-python {build.VERSION} already installed")
    build.require_baseline()  # here, in the cell, not minutes later in the background job's log
    cache = wheel_cache_dir(wheel_cache, drive_root)
    build.source_dir()  # the converter lives in the same source: the download/convert cells need it now
    job = start_build(cuda, arch, cache, command)
    if not background:
        job.wait()
    return job


def wait_for(job: BuildJob | None) -> None:
    """What serving calls first: nothing for the torch engine, else block until llama.cpp is installed."""
    if job is not None:
        job.wait()
