"""The llama.cpp build in the background: it overlaps the download and conversion, shows progress and an
estimate, surfaces failures, is found again after a kernel restart; and the Drive wheel cache.

A fake build command (a Python script that prints and waits) stands in for the compile; nothing is built."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nbkit.gguf import build
from nbkit.notebook import build_job, hub
from nbkit.notebook.env import Environment, Plan

FAKE_BUILD = textwrap.dedent("""
    import sys, time, pathlib
    marker = pathlib.Path(sys.argv[1])
    print("[nbkit build] building the cuda75 wheel (fake)", flush=True)
    for k in range(1, 1000):
        print(f"[{min(k, 99)}/100] Building CUDA object ggml-cuda/k{k}.cu.o", flush=True)
        if marker.exists():
            print("[nbkit build] saw the conversion finish; done", flush=True)
            sys.exit(0)
        time.sleep(0.05)
    print("the conversion never ran while the build did", flush=True)
    sys.exit(3)
""")
FAILING_BUILD = "print('[nbkit build] building'); print('nvcc fatal   : Unsupported gpu architecture compute_75x'); " \
                "raise SystemExit(2)"
FAKE_CONVERTER = textwrap.dedent("""
    import pathlib, sys
    args = sys.argv[1:]
    out = pathlib.Path(args[args.index("--outfile") + 1])
    print("INFO:hf-to-gguf:Loading model: fake", flush=True)
    out.write_bytes(b"GGUF")
    pathlib.Path(sys.argv[0]).with_name("converted").write_text("yes")
""")
LLAMACPP = Plan("llamacpp", "q8_0", 6.7, 1.5, 4.0, 14.7, "test")
CPU = Environment(colab=False, python="3.11", torch="2", cuda=None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "source_dir", lambda: tmp_path)  # no sdist download in these tests
    monkeypatch.setattr(build_job, "_jobs", {})
    started = []
    real_start = build_job.start_build
    monkeypatch.setattr(build_job, "start_build", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    yield tmp_path
    for job in started:  # never leave a fake build running
        if job.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()


def _script(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(code)
    return path


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A hub mirror with a model folder (.bin weights, sentencepiece file) and a fake converter."""
    repo = tmp_path / "mirror" / "acme" / "tiny"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"hidden_size": 16}))
    for name in ("tokenizer.model", "pytorch_model.bin"):
        (repo / name).write_bytes(b"x" * 64)
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    _script(vendor, "convert_hf_to_gguf.py", FAKE_CONVERTER)
    monkeypatch.setattr(build, "vendor_dir", lambda: vendor)
    return tmp_path / "mirror", vendor


@pytest.mark.slow  # a background build process (seconds): in `make test`, not the quick tier
def test_the_build_runs_while_the_model_downloads_and_converts(cache, mirror, capsys):
    mirror_dir, vendor = mirror
    fake = _script(cache, "fake_build.py", FAKE_BUILD)
    job = build_job.ensure_engine(LLAMACPP, CPU, command=[sys.executable, str(fake), str(vendor / "converted")])
    # the cell returned at once: the fake build only ends once the conversion, which comes after, has run
    assert job.state == "running"
    time.sleep(0.5)
    shown = repr(job)
    assert "building in the background" in shown and "% compiled" in shown and "left (estimate)" in shown
    assert "serving waits for the build" in shown and "last: [" in shown and "Building CUDA object" in shown

    prepared = hub.prepare("acme/tiny", "none", LLAMACPP, mirror=mirror_dir, build=job)
    assert (vendor / "converted").exists() and prepared.model.endswith(".q8_0.gguf")
    prepared.wait_for_engine()  # what serve() calls first
    assert job.state == "done" and "built and installed" in repr(job)
    assert "saw the conversion finish" in "\n".join(job.tail())  # it was still building while converting
    assert "INFO:hf-to-gguf:Loading model" in capsys.readouterr().out  # the converter's output reached the cell


@pytest.mark.slow  # a background build process (seconds): in `make test`, not the quick tier
def test_a_failed_build_says_why_where_serving_waits(cache, mirror):
    job = build_job.ensure_engine(LLAMACPP, CPU, command=[sys.executable, "-c", FAILING_BUILD])
    prepared = hub.Prepared("model.gguf", None, "llamacpp", build=job)
    with pytest.raises(build.BuildError) as err:
        prepared.wait_for_engine()
    assert "exit 2" in str(err.value) and "Unsupported gpu architecture" in str(err.value)
    assert str(job.log_file) in str(err.value)
    assert job.state == "failed" and "FAILED" in repr(job)
    from nbkit.notebook.widgets import run_benchmark

    with pytest.raises(build.BuildError, match="Unsupported gpu architecture"):  # before starting the benchmark
        run_benchmark(prepared, out=str(cache / "bench"))
    assert not (cache / "bench").exists()
    mirror_dir, _ = mirror
    with pytest.raises(build.BuildError, match="Unsupported gpu architecture"):  # before downloading gigabytes
        hub.prepare("acme/tiny", "none", LLAMACPP, mirror=mirror_dir, build=job)
    assert not hub.local_dir_for("acme/tiny").exists()


@pytest.mark.slow  # a background build process (seconds): in `make test`, not the quick tier
def test_rerunning_the_cell_or_restarting_the_kernel_finds_the_running_build(cache):
    marker = cache / "stop"
    cmd = [sys.executable, "-c", FAKE_BUILD, str(marker)]
    first = build_job.start_build(command=cmd)
    assert build_job.start_build(command=cmd) is first  # the cell ran again
    build_job._jobs.clear()  # a new kernel: no memory of the job, only the files
    attached = build_job.start_build(command=cmd)
    assert attached is not first and attached.proc is None and attached.state == "running"
    assert attached.log_file == first.log_file and attached.command == cmd
    marker.write_text("")
    first.wait(timeout=30)
    assert attached.wait(timeout=30).state == "done"  # the status comes from the file, not from being the parent


def test_an_attached_build_that_died_is_reported_not_awaited_forever(cache):
    cmd = [sys.executable, "-c", FAKE_BUILD, str(cache / "never")]
    first = build_job.start_build(command=cmd)
    build_job._jobs.clear()
    attached = build_job.start_build(command=cmd)
    os.killpg(first.proc.pid, signal.SIGKILL)  # the machine killed the build: no status file is written
    first.proc.wait()
    with pytest.raises(build.BuildError, match="exit"):
        attached.wait(timeout=30, poll_s=0.05)


def test_wait_prints_progress_and_times_out(cache, capsys):
    job = build_job.start_build(command=[sys.executable, "-c", FAKE_BUILD, str(cache / "never")])
    with pytest.raises(TimeoutError, match="still running"):
        job.wait(timeout=0.5, every_s=0.1, poll_s=0.05)
    assert "building in the background" in capsys.readouterr().out


def test_nothing_to_build_for_torch_or_when_installed(cache, monkeypatch, capsys):
    assert build_job.ensure_engine(Plan("torch", "f16", 12.6, 1.5, 4, 40, "x"), CPU) is None
    monkeypatch.setattr(build, "installed_bindings", lambda: (build.BINDINGS, False))
    job = build_job.ensure_engine(LLAMACPP, CPU)
    assert job.state == "done" and "already installed" in repr(job)
    job.wait()
    hub.Prepared("m.gguf", None, "llamacpp", build=job).wait_for_engine()


def test_a_cpu_without_the_baseline_is_refused_in_the_cell_before_any_build(cache, monkeypatch):
    (cache / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    monkeypatch.setattr(build, "CPUINFO", str(cache / "cpuinfo"))
    monkeypatch.setattr(build, "installed_bindings", lambda: None)
    with pytest.raises(build.BuildError, match="lacks avx2"):
        build_job.ensure_engine(LLAMACPP, CPU, command=[sys.executable, "-c", "raise SystemExit(0)"])
    assert build_job._jobs == {}  # nothing was started


def test_the_child_imports_this_checkout(cache):
    env = build_job._child_env()
    assert env["PYTHONPATH"].split(":")[0] == str(Path(build_job.__file__).resolve().parents[2])
    cmd = build_job.build_command(True, "75", cache / "wheels")
    assert cmd[1:] == ["-m", "nbkit", "build", "--cuda", "--cuda-arch", "75", "--wheel-cache", str(cache / "wheels")]


# --- the wheel cache -------------------------------------------------------------------------------------
@pytest.fixture
def fake_builds(cache, monkeypatch):
    """build._run records steps; a `pip wheel` step produces a wheel file; the toolchain is 'there'."""
    ran = []

    def run(cmd, step, env=None, cwd=None):
        ran.append(step)
        if step.startswith("wheel-"):
            out = Path(cmd[cmd.index("-w") + 1])
            (out / f"llama_cpp_python-{build.VERSION}-cp311-cp311-linux_x86_64.whl").write_bytes(b"built")

    monkeypatch.setattr(build, "_run", run)
    monkeypatch.setattr(build, "_check_toolchain", lambda cuda: {})
    monkeypatch.setattr(build, "sdist", lambda: cache / "sdist.tar.gz")
    monkeypatch.setattr(build, "cuda_toolkit_version", lambda: "12.8")
    monkeypatch.setattr(build, "installed_bindings", lambda: None)
    return ran


def test_wheel_key_names_version_cuda_architecture_and_python(monkeypatch):
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert build.wheel_tag() == f"cpu-avx2-fa{build.patches.DIGEST}-{py}"
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: build.subprocess.CompletedProcess(
        a, 0, "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.8, V12.8.93\n", ""))
    monkeypatch.setattr(build, "find_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    assert build.cuda_toolkit_version() == "12.8"
    assert build.wheel_tag(True, "75") == f"cuda75-avx2-cu12.8-fa{build.patches.DIGEST}-{py}"  # old: no CPU baseline in the key
    assert build.cached_wheel(Path("/nonexistent"), build.wheel_tag(True, "75")) is None


def test_drive_cache_first_session_saves_second_installs_in_seconds(cache, fake_builds, monkeypatch):
    drive = cache / "MyDrive"
    drive.mkdir()
    wheels = build_job.wheel_cache_dir("drive", drive_root=drive)
    assert wheels == drive / "nbkit" / "wheels"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"

    build.install_bindings(cuda=True, cuda_arch="75", cache=wheels)  # first session: builds, saves
    assert fake_builds == [f"wheel-cuda75-avx2-cu12.8-fa{build.patches.DIGEST}-{py}", "install", "install-deps"]
    saved = list((wheels / build.VERSION / f"cuda75-avx2-cu12.8-fa{build.patches.DIGEST}-{py}").glob("*.whl"))
    assert len(saved) == 1 and saved[0].read_bytes() == b"built"

    monkeypatch.setenv("NBKIT_CACHE_DIR", str(cache / "fresh-machine"))  # second session: a new VM, same Drive
    fake_builds.clear()
    whl = build.install_bindings(cuda=True, cuda_arch="75", cache=wheels)
    assert fake_builds == ["install", "install-deps"]  # no compile
    assert whl.read_bytes() == b"built" and str(cache / "fresh-machine") in str(whl)


@pytest.mark.parametrize("other", [("80", "12.8"), ("75", "12.4")])
def test_a_wheel_for_another_gpu_or_cuda_is_not_reused(cache, fake_builds, monkeypatch, other):
    wheels = cache / "wheels"
    arch, cuda = other
    monkeypatch.setattr(build, "cuda_toolkit_version", lambda: cuda)
    build.wheel(cuda=True, cuda_arch=arch, cache=wheels)
    monkeypatch.setattr(build, "cuda_toolkit_version", lambda: "12.8")
    fake_builds.clear()
    build.wheel(cuda=True, cuda_arch="75", cache=wheels)
    assert fake_builds and fake_builds[0].startswith("wheel-cuda75-avx2-cu12.8")


def test_a_native_wheel_cached_by_the_old_key_is_not_reused(cache, fake_builds):
    """Old: the key was `cuda75-cu12.8-pyXY`, and the wheel under it was built with -march=native on some other
    Colab VM: installing it here can die with 'Illegal instruction'. It must be rebuilt, portable."""
    wheels = cache / "wheels"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    native = wheels / build.VERSION / f"cuda75-cu12.8-{py}" / f"llama_cpp_python-{build.VERSION}-cp3-linux.whl"
    native.parent.mkdir(parents=True)
    native.write_bytes(b"native")
    whl = build.wheel(cuda=True, cuda_arch="75", cache=wheels)
    assert fake_builds == [f"wheel-cuda75-avx2-cu12.8-fa{build.patches.DIGEST}-{py}"] and whl.read_bytes() == b"built"


def test_a_cached_wheel_is_refused_on_a_cpu_without_its_baseline(cache, fake_builds, monkeypatch):
    wheels = cache / "wheels"
    build.wheel(cuda=True, cuda_arch="75", cache=wheels)  # saved on "Drive" by a VM with AVX2
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(cache / "old-cpu-vm"))
    (cache / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    monkeypatch.setattr(build, "CPUINFO", str(cache / "cpuinfo"))
    fake_builds.clear()
    with pytest.raises(build.BuildError, match="lacks avx2, fma, f16c, bmi2.*Illegal instruction"):
        build.install_bindings(cuda=True, cuda_arch="75", cache=wheels)
    assert fake_builds == [] and not (cache / "old-cpu-vm" / "llama-cpp" / build.VERSION / "wheels").exists()


def test_drive_is_mounted_in_colab_and_refused_elsewhere(cache, monkeypatch):
    assert build_job.wheel_cache_dir(None) is None and build_job.wheel_cache_dir("none") is None
    assert build_job.wheel_cache_dir(cache / "x") == cache / "x"
    monkeypatch.delenv("NBKIT_DRIVE_DIR", raising=False)
    missing = cache / "not-mounted"
    with pytest.raises(build.BuildError, match="needs Google Drive"):
        build_job.wheel_cache_dir("drive", drive_root=missing)

    import types

    mounted = []
    fake_drive = types.SimpleNamespace(mount=lambda where: (mounted.append(where), missing.mkdir()))
    colab = types.ModuleType("google.colab")
    colab.drive = fake_drive
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert build_job.wheel_cache_dir("drive", drive_root=missing) == missing / "nbkit" / "wheels"
    assert mounted == ["/content/drive"]


def test_a_full_drive_only_warns(cache, fake_builds, monkeypatch, capsys):
    def full(src, dest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "_copy_atomic", full)
    whl = build.wheel(cache=cache / "wheels")
    assert whl.is_file() and "could not save the wheel" in capsys.readouterr().out


def test_build_cli_passes_the_wheel_cache(monkeypatch, tmp_path):
    from nbkit.cli import main

    seen = {}
    monkeypatch.setattr(build, "install_bindings", lambda **kw: seen.update(kw))
    assert main(["build", "--cuda", "--cuda-arch", "75", "--wheel-cache", str(tmp_path)]) == 0
    assert seen == {"cuda": True, "cuda_arch": "75", "force": False, "cache": str(tmp_path)}
