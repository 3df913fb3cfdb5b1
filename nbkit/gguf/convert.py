"""GGUF conversion: a transformers folder -> GGUF with the vendored converter, then quantization.

The converter is `convert_hf_to_gguf.py` from the same pinned llama.cpp tree as the bindings (see
build.py), so the file format always matches the library that loads it. Quantization runs in-process
through the bindings (`llama_model_quantize`), so no CMake tool is needed. Each step writes to a
temporary name and renames at the end: a finished file is never half-written, and a second call with
the same output returns at once. Medusa heads are not converted: they stay in PyTorch and load with
`nbkit.medusa.heads.load_heads` whatever engine runs the base model.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama_ftype values (llama.h) for the quantization types worth offering.
QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
               "Q5_K_M": 17, "Q6_K": 18, "F16": 1}


def _say(msg: str) -> None:
    print(f"[nbkit convert] {msg}", flush=True)


def check_hf_dir(hf_dir: str | os.PathLike) -> Path:
    """A transformers model folder: config.json and weights (safetensors or pytorch .bin); else a clear error."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a transformers model folder)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise FileNotFoundError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): the GGUF needs one")
    return path


def _newest_input(path: Path) -> float:
    return max(f.stat().st_mtime for f in path.iterdir() if f.is_file())


def _fresh(out: Path, *inputs_mtime: float) -> bool:
    return out.is_file() and out.stat().st_size > 0 and all(out.stat().st_mtime >= m for m in inputs_mtime)


def stream(cmd: list[str], tail_lines: int = 25) -> tuple[int, list[str]]:
    """Run `cmd`, copying its output (stdout and stderr) to ours as it comes, so a notebook cell shows the
    converter's progress instead of minutes of silence. Returns (exit status, the last lines for errors).

    Raw chunks are passed on, so tqdm's carriage-return updates redraw one line in Jupyter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail: deque[str] = deque(maxlen=tail_lines)
    pending = ""
    while chunk := proc.stdout.read1(65536):
        text = decoder.decode(chunk)
        sys.stdout.write(text)
        sys.stdout.flush()
        *done, pending = re.split(r"[\r\n]", pending + text)
        tail.extend(line for line in done if line.strip())
    if pending.strip():
        tail.append(pending)
    return proc.wait(), list(tail)


def to_gguf(hf_dir: str | os.PathLike, outfile: str | os.PathLike, outtype: str = "f16") -> Path:
    """Run the vendored convert_hf_to_gguf.py (in a child Python); skipped when `outfile` is newer than the folder."""
    from .build import vendor_dir

    src = check_hf_dir(hf_dir)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)} (use quantize= for Q4_K_M etc.)")
    out = Path(outfile)
    if _fresh(out, _newest_input(src)):
        _say(f"{out} is up to date")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    script = vendor_dir() / "convert_hf_to_gguf.py"
    _say(f"converting {src} -> {out} ({outtype})")
    t0 = time.monotonic()
    rc, tail = stream([sys.executable, str(script), str(src), "--outtype", outtype, "--outfile", str(tmp)])
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {src} (exit {rc}):\n" + "\n".join(tail))
    tmp.rename(out)
    _say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - t0:.0f} s")
    return out


def quantize(gguf_in: str | os.PathLike, gguf_out: str | os.PathLike, qtype: str = "Q8_0",
             allow_requantize: bool = False, n_threads: int = 0) -> Path:
    """Quantize a GGUF through the bindings (`llama_model_quantize`); skipped when the output is up to date.

    allow_requantize: accept an already quantized input (e.g. the embedded Q4_1 -> Q8_0, which holds
    Q4_1's values almost exactly).
    """
    from .bindings import llama_cpp_module

    src, out = Path(gguf_in), Path(gguf_out)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    key = qtype.upper()
    if key not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {qtype!r}: choose from {', '.join(QUANT_TYPES)}")
    if _fresh(out, src.stat().st_mtime):
        _say(f"{out} is up to date")
        return out
    lib = llama_cpp_module()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[key]
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    _say(f"quantizing {src.name} -> {out.name} ({key})")
    t0 = time.monotonic()
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        hint = " (the input is already quantized: allow_requantize=True)" if not allow_requantize else ""
        raise RuntimeError(f"llama_model_quantize failed on {src} (code {rc}){hint}")
    tmp.rename(out)
    _say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - t0:.0f} s")
    return out


def convert(hf_dir: str | os.PathLike, outfile: str | os.PathLike | None = None, outtype: str = "f16",
            quantize_to: str | None = None) -> Path:
    """HF folder -> `<name>.<outtype>.gguf` (+ `<name>.<Q>.gguf` when quantize_to is set); returns the final file.

    Default location: the folder `$NBKIT_CACHE_DIR/gguf/`.
    """
    from ..models import cache_dir

    src = check_hf_dir(hf_dir)
    name = src.resolve().name
    folder = Path(outfile).parent if outfile else cache_dir() / "gguf"
    label = quantize_to.upper() if quantize_to else outtype
    final = Path(outfile) if outfile else folder / f"{name}.{label}.gguf"
    if quantize_to is None:
        return to_gguf(src, final, outtype)
    if _fresh(final, _newest_input(src)):
        _say(f"{final} is up to date")
        return final
    base = folder / f"{name}.{outtype}.gguf"  # kept: a later run with another quantization reuses it
    if base == final:
        base = folder / f"{name}.{outtype}.src.gguf"
    return quantize(to_gguf(src, base, outtype), final, quantize_to)
