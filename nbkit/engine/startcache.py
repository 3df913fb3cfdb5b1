"""What a start-up measured, kept for the next start on the same machine: the cost model's calibration and
the self-check's verdict.

Both are properties of the machine (CPU model and threads, or GPU name), the model and heads files, the
engine with its mode, dtype and batch, the library versions and nbkit's code: the key holds all of them. A
file whose key differs in any part (another nbkit, a model file rewritten, another thread count) is stale;
one that does not parse is corrupt: either is ignored with a log line, measured again and rewritten. The
cached prices are a start: while serving, the cost model follows the machine and re-measures on drift
(speculation/guard.py), as after a fresh calibration.

NBKIT_STARTUP_CACHE=off turns the cache off. Files live in $NBKIT_CACHE_DIR/startup/, one per (machine,
model, heads, engine and its settings), named by a hash of that part of the key; the rest of the key
(versions, file sizes and times) is checked inside.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
from pathlib import Path

import torch

from .. import __version__
from .selfcheck import RunFigures, SelfCheck
from .speculation import CostModel

log = logging.getLogger("nbkit.engine")

FORMAT = 1
# The parts of the key that name the file; the others (versions, model file sizes and times) make it stale.
NAMING = ("machine", "engine", "model_path", "heads_path", "settings")


def enabled() -> bool:
    """NBKIT_STARTUP_CACHE=off measures at every start (the test suite does: its tests patch clocks and checks)."""
    return os.environ.get("NBKIT_STARTUP_CACHE", "on").lower() not in ("off", "0", "false", "no")


def cache_root() -> Path:
    from ..models import cache_dir

    return cache_dir() / "startup"


class StartupCache:
    """One start-up's record for one key: load() once, then read and write its parts."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = key
        name = hashlib.sha256(json.dumps({k: key[k] for k in NAMING}, sort_keys=True).encode()).hexdigest()[:20]
        self.path = (root or cache_root()) / f"{name}.json"
        self.record: dict = self._load()

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            record = json.loads(self.path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
                raise ValueError("no key")
        except (OSError, ValueError) as err:
            log.warning("start-up cache %s is corrupt (%s): ignored, measuring again", self.path, err)
            return {}
        changed = sorted(k for k in set(record["key"]) | set(self.key) if record["key"].get(k) != self.key.get(k))
        if changed:
            log.info("start-up cache %s is stale (%s changed): ignored, measuring again", self.path, ", ".join(changed))
            return {}
        return record

    def _save(self, part: str, value: dict) -> None:
        self.record = {**self.record, "key": self.key, part: value}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: a concurrent start reads the old file or the new one
        except OSError as err:
            log.warning("cannot write the start-up cache %s: %s", self.path, err)

    # ---- the cost model's calibration --------------------------------------------------------
    def costs(self) -> CostModel | None:
        """The calibrated cost model of an earlier start (None: none, or corrupt)."""
        part = self.record.get("costs")
        if part is None:
            return None
        try:
            points = {int(n): _seconds(v) for n, v in part["points"].items()}
            heads = {int(n): _seconds(v) for n, v in part["heads"].items()}
            measured = {(int(r), int(t)): _seconds(v) for r, t, v in part["measured"]}
        except (KeyError, TypeError, ValueError) as err:
            log.warning("start-up cache %s: the calibration is corrupt (%s): measuring again", self.path, err)
            return None
        model = CostModel(points, heads or 0.0)
        model.measured.update(measured)
        model.set_reference()
        return model

    def save_costs(self, model: CostModel) -> None:
        self._save("costs", {"points": model.points, "heads": model.heads_points,
                             "measured": [[r, t, v] for (r, t), v in model.measured.items()]})

    # ---- the self-check's verdict ------------------------------------------------------------
    def self_check(self) -> SelfCheck | None:
        """The verdict of an earlier identical self-check (None: none, or corrupt); `cached` is True."""
        part = self.record.get("self_check")
        if part is None:
            return None
        try:
            runs = {name: RunFigures(**figures) for name, figures in part["runs"].items()}
            return SelfCheck(bool(part["passed"]), float(part["tolerance"]), runs, str(part["device"]),
                             str(part["dtype"]), float(part["seconds"]), cached=True)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("start-up cache %s: the self-check verdict is corrupt (%s): checking again", self.path, err)
            return None

    def save_self_check(self, check: SelfCheck) -> None:
        d = check.to_dict()
        self._save("self_check", {k: d[k] for k in ("passed", "tolerance", "device", "dtype", "seconds", "runs")})


def _seconds(value) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a time")
    return seconds


def startup_key(engine_kind: str, model_file: Path, heads_path: Path | None, runner, engine) -> dict:
    """Everything a calibration and a self-check depend on (engine: built, not yet prepared)."""
    spec = engine.speculation
    settings = {"dtype": str(runner.dtype), "mode": getattr(runner, "mode", None),
                "kv": [getattr(runner, "k_type", None), getattr(runner, "v_type", None)],
                "max_batch": engine.max_batch, "max_context": runner.max_context, "speculation": spec.mode,
                "tree": (spec.fixed or engine.base_tree).name, "max_leaves": runner.max_leaves}
    return {"format": FORMAT, "machine": machine(runner), "engine": engine_kind,
            "model_path": str(model_file.resolve()), "heads_path": str(heads_path.resolve()) if heads_path else None,
            "settings": settings, "model_files": file_identity(model_file),
            "heads_files": file_identity(heads_path) if heads_path else None,
            "versions": {"nbkit": __version__, "code": code_fingerprint(), "torch": torch.__version__,
                         "llama_cpp": _llama_version() if engine_kind == "llamacpp" else None}}


def machine(runner) -> str:
    """The GPU's name, or the CPU's model with the threads the engine's kernels run on."""
    if runner.device.type == "cuda":
        return torch.cuda.get_device_name(runner.device)
    threads = getattr(getattr(runner, "context", None), "n_threads", None) or torch.get_num_threads()
    llama_threads = os.environ.get("NBKIT_LLAMA_THREADS", "")
    return f"{_cpu_model()}, {os.cpu_count()} cpus, {threads} threads{f', llama {llama_threads}' * bool(llama_threads)}"


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def file_identity(path: Path) -> list:
    """[name, size, mtime_ns] of a file, or of every file in a folder (top level: weights, config, tokenizer)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@functools.cache
def code_fingerprint() -> str:
    """A hash of nbkit's own source: a verdict or a price measured with other code is stale (the version
    number alone does not change between commits)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _llama_version() -> str | None:
    """llama-cpp-python's version and the attention kernel its ggml carries (a rebuilt kernel prices anew)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from ..gguf.patches import kernel_digest

    return f"{getattr(llama_cpp, '__version__', None)}+fa.{kernel_digest() or 'none'}"
