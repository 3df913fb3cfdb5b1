"""Build helpers: idempotent steps, flags per machine, clear errors when a tool is missing (no compiling here)."""

import subprocess
import sys

import pytest

from nbkit.gguf import build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path))
    ran = []
    monkeypatch.setattr(build, "_run", lambda cmd, step, env=None, cwd=None: ran.append((step, cmd, env)))
    return build.root(), ran


def test_cpu_flags_name_instruction_sets_instead_of_native():
    flags = build.cmake_args()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags
    assert not any("native" in f and "NATIVE" not in f for f in flags)


def test_the_cuda_build_names_the_same_cpu_baseline_instead_of_native():
    """Old: the CUDA flags were only GGML_CUDA + the architecture, so ggml compiled -march=native for the CPU code
    and the wheel, cached on Drive, died with 'Illegal instruction' on the next Colab VM's CPU."""
    flags = build.cmake_args(cuda=True, cuda_arch="75")
    assert "-DGGML_NATIVE=OFF" in flags and "-DCMAKE_CUDA_ARCHITECTURES=75" in flags
    assert {f"-DGGML_{f.upper()}=ON" for f in build.CPU_BASELINE} <= set(flags)
    assert set(build.CPU_FLAGS) <= set(flags) and set(build.CPU_FLAGS) <= set(build.cmake_args())


INTEL_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c bmi1 bmi2 avx512f\n\nprocessor\t: 1\n"
OLD_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 sse4_2 avx\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"


@pytest.mark.parametrize(("text", "lacking"), [(INTEL_CPUINFO, []), (OLD_CPUINFO, ["avx2", "fma", "f16c", "bmi2"]),
                                               (ARM_CPUINFO, [])], ids=["avx512-vm", "sandy-bridge", "arm"])
def test_missing_cpu_flags_reads_proc_cpuinfo(tmp_path, text, lacking):
    (tmp_path / "cpuinfo").write_text(text)
    assert build.missing_cpu_flags(tmp_path / "cpuinfo") == lacking
    assert build.missing_cpu_flags(tmp_path / "absent") == []  # no /proc (macOS): cannot tell, nothing refused


@pytest.mark.parametrize(("cap", "arch"), [("7.5", "75"), ("8.0", "80"), ("9.0", "90")])
def test_cuda_architecture_comes_from_the_gpu(monkeypatch, cap, arch):
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, f"{cap}\n", ""))
    assert build.detect_cuda_arch() == arch
    assert f"-DCMAKE_CUDA_ARCHITECTURES={arch}" in build.cmake_args(cuda=True)
    assert build.flavour(cuda=True) == f"cuda{arch}"


def test_no_gpu_is_a_clear_error(monkeypatch):
    def no_smi(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(build.subprocess, "run", no_smi)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(build.BuildError, match="75 for T4"):
        build.detect_cuda_arch()


def test_missing_compiler_and_nvcc_are_clear_errors(cache, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="no C/C\\+\\+ compiler"):
        build.wheel()
    monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "nvcc" else f"/usr/bin/{name}")
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(build.BuildError, match="CUDA toolkit"):
        build.wheel(cuda=True, cuda_arch="75")
    assert cache[1] == []  # nothing was started


def test_wheel_and_tools_are_built_once(cache):
    root, ran = cache
    tag = f"cpu-avx2-fa{build.patches.DIGEST}-py{sys.version_info.major}{sys.version_info.minor}"
    whl = root / "wheels" / tag / f"llama_cpp_python-{build.VERSION}-py3-none-linux_x86_64.whl"
    whl.parent.mkdir(parents=True)
    whl.write_bytes(b"")
    assert build.wheel() == whl
    bin_dir = root / "build-cpu-avx2" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in build.TOOLS:
        (bin_dir / tool).write_bytes(b"")
    assert build.build_tools() == bin_dir
    assert ran == []  # found, not rebuilt


def test_install_is_skipped_when_the_right_bindings_are_there(cache, monkeypatch):
    monkeypatch.setattr(build, "installed_bindings", lambda: (build.BINDINGS, False))
    assert build.install_bindings() is None
    assert cache[1] == []
    # The CUDA flavour is wanted but the CPU one is installed: that needs a build.
    monkeypatch.setattr(build, "wheel", lambda cuda=False, cuda_arch=None, cache_dir=None: cache[0] / "x.whl")
    assert build.install_bindings(cuda=True, cuda_arch="75") == cache[0] / "x.whl"
    assert [step for step, _, _ in cache[1]] == ["install", "install-deps"]


def test_build_cli_reports_errors(monkeypatch, capsys):
    from nbkit.cli import main

    def fail(**kw):
        raise build.BuildError("no C/C++ compiler found")

    monkeypatch.setattr(build, "install_bindings", fail)
    assert main(["build"]) == 1
    assert "no C/C++ compiler found" in capsys.readouterr().out


def _sdist(path, members: dict[str, str | None], links: dict[str, str] | None = None) -> None:
    """A tar.gz with `members` (name -> text, None for a folder) and symlinks (name -> target)."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            if text is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


@pytest.mark.parametrize("filters", [True, False], ids=["data-filter", "python-3.11.2"])
def test_the_sdist_unpacks_with_or_without_tarfile_filters(cache, monkeypatch, filters):
    """Debian 12's Python 3.11.2 has no extraction filters (3.11.4 added them): unpacking must still work."""
    import tarfile

    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    top = f"llama_cpp_python-{build.VERSION}"
    ops = "".join(anchor for anchor, _ in build.patches.EDITS)  # what the kernel patch anchors on
    _sdist(build.root() / build.SDIST, {top: None, f"{top}/vendor/llama.cpp/CMakeLists.txt": "project(llama)",
                                        f"{top}/vendor/llama.cpp/{build.patches.OPS}": ops},
           {f"{top}/vendor/llama.cpp/CMakeLists.link": "CMakeLists.txt"})
    src = build.source_dir()
    assert (src / "vendor" / "llama.cpp" / "CMakeLists.txt").read_text() == "project(llama)"
    assert build.patches.DIGEST in (src / "vendor" / "llama.cpp" / build.patches.OPS).read_text()
    assert (src / "vendor" / "llama.cpp" / "CMakeLists.link").read_text() == "project(llama)"
    assert [p.name for p in build.root().iterdir() if p.name.startswith("src.tmp")] == []


@pytest.mark.parametrize(("members", "links"), [
    ({"../outside.txt": "x"}, {}),
    ({}, {"llama_cpp_python/escape": "../../outside.txt"}),
], ids=["dot-dot", "symlink-out"])
def test_an_archive_that_escapes_is_refused_without_tarfile_filters(cache, monkeypatch, members, links):
    import tarfile

    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    _sdist(build.root() / build.SDIST, members, links)
    with pytest.raises(build.BuildError, match="outside"):
        build.source_dir()
    assert not (build.root().parent / "outside.txt").exists()
    assert not (build.root() / "src").exists()
