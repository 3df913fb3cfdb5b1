"""The one change nbkit makes to the pinned llama.cpp tree before building it: a placement-invariant flash
attention for ggml's CPU backend (`fa_rows.inc`, why in its header), which the llama.cpp runner's exact mode
runs on (K and V caches of different types select it).

`apply(vendor)` copies the kernel next to ggml-cpu's ops.cpp, includes it there and dispatches to it from
ggml's flash attention. Each edit is an exact-text anchor that must occur once: a changed llama.cpp pin fails
loudly here instead of building without the kernel. `DIGEST` names the patch in wheel cache keys, so a wheel
built without it (or with an older version) is never reused.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

KERNEL = Path(__file__).with_name("fa_rows.inc")
INCLUDED_AS = "fa_rows.inc"  # its name beside ops.cpp (the #include below)
OPS = Path("ggml/src/ggml-cpu/ops.cpp")
MARK = "// nbkit patch: fa_rows.inc"
# (anchor, text inserted before it)
EDITS = (
    ("static void ggml_compute_forward_flash_attn_ext_f16(\n",
     f'{MARK}\n#define NBKIT_FA_ROWS_DIGEST "@DIGEST@"\n#include "fa_rows.inc"\n\n'),
    ("        // total rows in q\n        const int64_t nr = neq1*neq2*neq3;\n",
     "        if (!use_ref && nbkit_fa_rows_applies(dst)) {  // nbkit: exact mode's kernel\n"
     "            ggml_compute_forward_flash_attn_ext_rows(params, dst);\n"
     "            return;\n"
     "        }\n\n"),
)


def _digest() -> str:
    h = hashlib.sha256(KERNEL.read_bytes())
    for anchor, text in EDITS:
        h.update(anchor.encode() + b"\0" + text.encode())
    return h.hexdigest()[:10]


DIGEST = _digest()


class PatchError(RuntimeError):
    """The pinned llama.cpp tree does not have the text a patch anchors on."""


def apply(vendor: Path) -> bool:
    """Patch `vendor` (a llama.cpp tree) in place, always from its pristine ops.cpp (kept beside it as
    ops.cpp.orig), so a newer patch replaces an older one; False when it already carries this one."""
    ops = vendor / OPS
    pristine = ops.with_name(ops.name + ".orig")
    if not pristine.is_file():
        if MARK in ops.read_text():
            raise PatchError(f"{ops} is patched but its pristine copy is gone: unpack the sdist again")
        pristine.write_bytes(ops.read_bytes())
    src = pristine.read_text()
    for anchor, text in EDITS:
        if src.count(anchor) != 1:
            raise PatchError(f"{OPS}: expected one occurrence of {anchor.strip()!r}, found {src.count(anchor)}")
        src = src.replace(anchor, text + anchor)
    src = src.replace("@DIGEST@", DIGEST, 1)
    kernel = ops.parent / INCLUDED_AS
    if ops.read_text() == src and kernel.is_file() and kernel.read_bytes() == KERNEL.read_bytes():
        return False
    kernel.write_bytes(KERNEL.read_bytes())
    ops.write_text(src)
    return True


@functools.cache
def kernel_digest(lib_dir: Path | None = None) -> str | None:
    """The patch digest of the ggml CPU library llama-cpp-python loads (its `lib/` folder unless given), or
    None when that library was built without the kernel (exact mode then runs ggml's own row kernel: the
    same guarantee, slower prefill)."""
    import ctypes

    if lib_dir is None:
        try:
            import llama_cpp
        except ImportError:
            return None
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("libggml-cpu*")):
        try:
            fn = ctypes.CDLL(str(path)).nbkit_fa_rows_digest
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_char_p
        return fn().decode()
    return None
