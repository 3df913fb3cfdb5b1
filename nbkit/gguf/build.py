"""Getting llama.cpp: bindings, converter and tools from ONE pinned source, built for this machine.

The llama-cpp-python sdist on PyPI vendors the whole llama.cpp tree (library, CMake tools,
convert_hf_to_gguf.py, gguf-py), so pinning that one version pins all of them to the same commit,
and any machine that reaches PyPI (Colab included) can build it.

Everything lands under `$NBKIT_CACHE_DIR/llama-cpp/<version>/`: the sdist, its unpacked source, one
wheel per build flavour (`wheels/cpu-avx2-py311/`, `wheels/cuda90-avx2-cu12.8-py311/`) and CMake build folders for
the tools. Every step first looks for its result and returns at once when it is there, so calling
`install_bindings()` from a notebook cell or `make setup` twice costs nothing the second time.

CPU flags: ggml's default `-march=native` compiles for the building machine's CPU (an AMX or AVX-512 path)
and the binary dies with "Illegal instruction" on another VM, so EVERY build, the CUDA one included (its
CPU code runs too: sampling, the host side of each op), names one baseline of instruction sets instead
(AVX/AVX2/FMA/F16C/BMI2: Intel since Haswell, AMD since Zen) with GGML_NATIVE off. That baseline is part of the
wheel's cache key, and a machine whose /proc/cpuinfo lacks one of its flags is refused before a cached
wheel is installed. CUDA: the architecture comes from the GPU (T4 75, A100 80, L4 89, H100 90); "native"
fails on a machine without a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import patches

VERSION = "0.3.36"  # llama-cpp-python; vendors ggml-org/llama.cpp at 0c1e57098
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
# The x86 baseline every wheel is compiled for, as /proc/cpuinfo names the flags, and its name in cache keys.
CPU_BASELINE = ("avx", "avx2", "fma", "f16c", "bmi2")
BASELINE_NAME = "avx2"  # rename it whenever CPU_BASELINE changes: wheels built for another baseline must not match
CPU_FLAGS = ["-DGGML_NATIVE=OFF", *(f"-DGGML_{flag.upper()}=ON" for flag in CPU_BASELINE)]
CPUINFO = "/proc/cpuinfo"  # where Linux lists this CPU's flags
COMMON_FLAGS = ["-DLLAVA_BUILD=OFF"]
TOOLS = ("llama-quantize", "llama-server")


class BuildError(RuntimeError):
    """A build step failed or cannot run here (missing compiler, CUDA, network)."""


def _say(msg: str) -> None:
    print(f"[nbkit build] {msg}", flush=True)


def root() -> Path:
    from ..models import cache_dir

    path = cache_dir() / "llama-cpp" / VERSION
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- the source ------------------------------------------------------------------------------
def sdist() -> Path:
    """The pinned sdist, downloaded once with pip."""
    path = root() / SDIST
    if path.is_file():
        return path
    _say(f"downloading llama-cpp-python=={VERSION} (sdist, ~77 MB)")
    with tempfile.TemporaryDirectory(dir=root()) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", tmp], "download")
        got = Path(tmp) / SDIST
        if not got.is_file():
            raise BuildError(f"pip did not produce {SDIST}")
        got.rename(path)
    return path


def source_dir() -> Path:
    """The unpacked sdist (bindings + vendor/llama.cpp) with nbkit's kernel patched in: what gets built."""
    path = root() / "src"
    if not (path / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        archive = sdist()
        _say(f"unpacking {archive.name}")
        tmp = Path(tempfile.mkdtemp(dir=root(), prefix="src.tmp"))
        try:
            with tarfile.open(archive) as tar:
                _extract(tar, tmp)
            (tmp / f"llama_cpp_python-{VERSION}").rename(path)
        except FileExistsError:
            pass  # another process finished first
        except OSError as err:
            if not path.exists():
                raise BuildError(f"cannot unpack {archive}: {err}") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if patches.apply(path / "vendor" / "llama.cpp"):  # a new sdist or a new patch
        _say(f"patched ggml's CPU flash attention (nbkit kernel {patches.DIGEST})")
    return path


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract with tarfile's "data" filter; a Python without it (before 3.11.4: Debian 12 ships 3.11.2) gets
    the filter's main refusals checked here: no member or link target outside `dest`, no device files."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    inside = dest.resolve()
    for member in tar.getmembers():
        target = (inside / member.name).resolve()
        if member.issym():
            linked = (target.parent / member.linkname).resolve()
        elif member.islnk():
            linked = (inside / member.linkname).resolve()
        else:
            linked = target
        if member.isdev() or not (target.is_relative_to(inside) and linked.is_relative_to(inside)):
            raise BuildError(f"refusing to unpack {member.name!r}: a device file, or a path outside {dest}")
    tar.extractall(dest)


def vendor_dir() -> Path:
    """vendor/llama.cpp: convert_hf_to_gguf.py, gguf-py/, the CMake project."""
    return source_dir() / "vendor" / "llama.cpp"


# ---- toolchain checks --------------------------------------------------------------------------
def _require_compiler() -> None:
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cc or not shutil.which(cc) or not cxx or not shutil.which(cxx):
        raise BuildError("no C/C++ compiler found: install one (Debian/Ubuntu: apt-get install build-essential; "
                         "macOS: xcode-select --install) or set CC/CXX")


def _require_cmake() -> str:
    cmake = shutil.which("cmake")
    if not cmake:
        raise BuildError("cmake not found: pip install cmake ninja (or apt-get install cmake)")
    return cmake


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def detect_cuda_arch() -> str:
    """The GPU's compute capability as a CMake architecture: T4 -> 75, A100 -> 80, H100 -> 90."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=30)
        caps = [line.strip() for line in out.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]
    except (OSError, subprocess.TimeoutExpired):
        caps = []
    if not caps:
        try:
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability(0)
                caps = [f"{major}.{minor}"]
        except ImportError:
            pass
    if not caps:
        raise BuildError("no NVIDIA GPU found to detect the CUDA architecture: pass --cuda-arch (cuda_arch=) "
                         "(75 for T4, 80 for A100, 90 for H100) or build for the CPU")
    return caps[0].replace(".", "")


def cmake_args(cuda: bool = False, cuda_arch: str | None = None) -> list[str]:
    """CMake flags: the CPU baseline always (ggml's default is -march=native), plus the GPU's architecture."""
    if cuda:
        arch = cuda_arch or detect_cuda_arch()
        return ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", *CPU_FLAGS, *COMMON_FLAGS]
    return [*CPU_FLAGS, *COMMON_FLAGS]


def flavour(cuda: bool = False, cuda_arch: str | None = None) -> str:
    return f"cuda{cuda_arch or detect_cuda_arch()}" if cuda else f"cpu-{BASELINE_NAME}"


def missing_cpu_flags(cpuinfo: str | os.PathLike | None = None) -> list[str]:
    """The baseline's instruction sets this CPU lacks ([] where it cannot tell: no /proc, not an x86 CPU)."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() == "flags"), None)
    if line is None:  # ARM ("Features") or an unusual kernel: the x86 baseline says nothing there
        return []
    have = set(line.split(":", 1)[1].split())
    return [flag for flag in CPU_BASELINE if flag not in have]


def require_baseline(cpuinfo: str | os.PathLike | None = None) -> None:
    """Refuse (BuildError) to install or build a wheel for a baseline this CPU lacks: it would die with SIGILL."""
    if lacking := missing_cpu_flags(cpuinfo):
        raise BuildError(f"this CPU lacks {', '.join(lacking)} (per {cpuinfo or CPUINFO}): the llama.cpp wheels "
                         f"are built for the {BASELINE_NAME} baseline ({', '.join(CPU_BASELINE)}) and would die "
                         "with 'Illegal instruction' here; use the torch engine (ENGINE='torch') on this machine")


def _check_toolchain(cuda: bool) -> dict[str, str]:
    _require_compiler()
    env = {}
    if cuda:
        nvcc = find_nvcc()
        if nvcc is None:
            raise BuildError("the CUDA build needs the CUDA toolkit (nvcc not found on PATH or in "
                             "/usr/local/cuda/bin); Colab GPU runtimes have it")
        env["CUDACXX"] = nvcc
    return env


# ---- running a step with progress ------------------------------------------------------------
_PROGRESS = re.compile(r"\[(\d+)/(\d+)\]")


def _run(cmd: list[str], step: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run a command, log everything to a file, print compile progress every ~10%, fail with the log's tail."""
    log_dir = root() / "logs"
    log_dir.mkdir(exist_ok=True)
    log_file = log_dir / f"{step}.log"
    full_env = {**os.environ, **(env or {})}
    t0, shown = time.monotonic(), -1
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                cwd=cwd, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            m = _PROGRESS.search(line)
            if m and int(m[2]) > 10:
                pct = 100 * int(m[1]) // int(m[2])
                if pct // 10 > shown:
                    shown = pct // 10
                    _say(f"{step}: {pct:3d}% ({m[1]}/{m[2]}) after {time.monotonic() - t0:.0f} s")
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise BuildError(f"{step} failed (exit {rc}); full log: {log_file}\n{tail}")
    _say(f"{step}: done in {time.monotonic() - t0:.0f} s")


# ---- the bindings ----------------------------------------------------------------------------
def cuda_toolkit_version() -> str | None:
    """The CUDA toolkit that compiles the wheel ("12.8", from `nvcc --version`): the runtime it links against."""
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m[1] if m else None


def wheel_tag(cuda: bool = False, cuda_arch: str | None = None) -> str:
    """What a built wheel depends on: GPU architecture, CPU baseline, CUDA toolkit version, Python version.

    e.g. `cuda75-avx2-cu12.8-fa<digest>-py313` (a T4 on Colab) or `cpu-avx2-fa<digest>-py311` (fa: the kernel
    patch); the llama-cpp-python version is the folder above it. A wheel is only reused where all of these
    match (a CUDA wheel keyed without a baseline was built with -march=native: it never matches)."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    fa = f"fa{patches.DIGEST}"  # the kernel patch: a wheel built without it (or with another) never matches
    if not cuda:
        return f"{flavour()}-{fa}-{py}"
    return f"{flavour(True, cuda_arch)}-{BASELINE_NAME}-cu{cuda_toolkit_version() or 'unknown'}-{fa}-{py}"


def _copy_atomic(src: Path, dest: Path) -> Path:
    """Copy to a temporary name, then rename: a reader (or a later session) never sees half a wheel."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return dest


def cached_wheel(cache: Path, tag: str) -> Path | None:
    """A wheel saved by an earlier session in `cache/<version>/<tag>/` (e.g. on Google Drive), or None."""
    found = sorted((cache / VERSION / tag).glob("llama_cpp_python-*.whl"))
    return found[-1] if found else None


def save_to_cache(whl: Path, cache: Path, tag: str) -> Path | None:
    """Keep a copy of a freshly built wheel for the next session; a full or missing Drive only costs a warning."""
    try:
        return _copy_atomic(whl, cache / VERSION / tag / whl.name)
    except OSError as err:
        _say(f"could not save the wheel to the cache {cache} ({err}); the next session builds again")
        return None


def wheel(cuda: bool = False, cuda_arch: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """A llama-cpp-python wheel for this flavour and Python, built once from the pinned sdist (~4 min on 2 cores).

    `cache`: a folder that outlives the machine (Google Drive in Colab): a wheel there with the same
    `wheel_tag()` is copied instead of building, and a new build is saved there."""
    require_baseline()  # before any wheel is handed out: a cached one would crash this CPU too
    tag = wheel_tag(cuda, cuda_arch)
    out = root() / "wheels" / tag
    found = sorted(out.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    if cache is not None and (saved := cached_wheel(Path(cache), tag)) is not None:
        _say(f"using the cached wheel {saved}")
        return _copy_atomic(saved, out / saved.name)
    env = _check_toolchain(cuda)
    src = source_dir()  # the sdist unpacked and patched
    env["CMAKE_ARGS"] = " ".join(cmake_args(cuda, cuda_arch))
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(os.cpu_count() or 2)
    _say(f"building the {tag} wheel with CMAKE_ARGS={env['CMAKE_ARGS']!r} (minutes; CUDA takes longer)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=tag + ".tmp"))
    try:
        # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back another flavour.
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-v", str(src), "-w", str(tmp)],
             f"wheel-{tag}", env)
        built = sorted(tmp.glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError("pip wheel finished without a wheel")
        out.mkdir(exist_ok=True)
        target = out / built[0].name
        built[0].rename(target)
        if cache is not None:
            save_to_cache(target, Path(cache), tag)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BINDINGS = f"{VERSION}+fa.{patches.DIGEST}"  # what installed_bindings() reports for this module's builds


def installed_bindings() -> tuple[str, bool] | None:
    """(version, gpu offload) of the importable llama-cpp-python, or None (checked in a child). The version
    names the kernel patch in its ggml CPU library: `BINDINGS` for this module's builds, "+fa.none" for stock."""
    code = ("import llama_cpp as l, sys; from nbkit.gguf.patches import kernel_digest as k; sys.stdout.write("
            "f'{l.__version__}+fa.{k() or \"none\"} {int(l.llama_supports_gpu_offload())}')")
    root = str(Path(__file__).resolve().parents[2])  # nbkit's checkout: the child imports nbkit.gguf.patches
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                             env=env)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0 or not res.stdout:
        return None
    version, gpu = res.stdout.split()
    return version, gpu == "1"


def install_bindings(cuda: bool = False, cuda_arch: str | None = None, force: bool = False,
                     cache: str | os.PathLike | None = None) -> Path | None:
    """Make `import llama_cpp` work with the wanted flavour: build the wheel if needed, pip install it.

    Returns the wheel installed, or None when the right bindings were already there. `cache`: see wheel().
    """
    have = installed_bindings()
    if have == (BINDINGS, cuda) and not force:
        _say(f"llama-cpp-python {VERSION} ({'CUDA' if cuda else 'CPU'}) already installed")
        return None
    whl = wheel(cuda, cuda_arch, cache)
    _say(f"installing {whl.name}")
    # --force-reinstall swaps a same-version build of another flavour; the second call adds missing deps only.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(whl)], "install")
    _run([sys.executable, "-m", "pip", "install", str(whl)], "install-deps")
    return whl


# ---- CMake tools (llama-quantize, llama-server) ---------------------------------------------
def build_tools(targets: tuple[str, ...] = TOOLS, cuda: bool = False, cuda_arch: str | None = None) -> Path:
    """Build llama.cpp's own tools from the same vendored tree; returns the folder holding the binaries."""
    build = root() / f"build-{flavour(cuda, cuda_arch)}"
    bin_dir = build / "bin"
    missing = [t for t in targets if not (bin_dir / t).is_file()]
    if not missing:
        return bin_dir
    env = _check_toolchain(cuda)
    cmake = _require_cmake()
    src = vendor_dir()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([cmake, "-S", str(src), "-B", str(build), *generator, *cmake_args(cuda, cuda_arch),
          "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
          "-DLLAMA_CURL=OFF"], "cmake-configure", env)
    _run([cmake, "--build", str(build), "--target", *missing, "-j", str(os.cpu_count() or 2)],
         "cmake-build-" + "-".join(missing), env)
    return bin_dir


def tool(name: str, cuda: bool = False) -> Path:
    """Path of a built tool (builds it on first use)."""
    return build_tools((name,), cuda=cuda) / name
