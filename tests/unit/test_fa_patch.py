"""The kernel patch nbkit applies to the pinned llama.cpp tree (nbkit/gguf/patches): it lands once, is redone
from the pristine source when the kernel changes, and refuses a tree without its anchors (a new pin must fail
loudly, not build without the kernel). That the built library carries it: tests/llamacpp/test_fa_rows.py."""

import pytest

from nbkit.gguf import patches


@pytest.fixture
def tree(tmp_path):
    ops = tmp_path / patches.OPS
    ops.parent.mkdir(parents=True)
    ops.write_text("// head\n" + "".join(f"{anchor}  body();\n}}\n" for anchor, _ in patches.EDITS))
    return tmp_path


def test_applies_once_with_its_digest_and_the_kernel_beside_ops(tree):
    pristine = (tree / patches.OPS).read_text()
    assert patches.apply(tree) is True
    src = (tree / patches.OPS).read_text()
    assert f'#define NBKIT_FA_ROWS_DIGEST "{patches.DIGEST}"' in src
    assert src.count('#include "fa_rows.inc"') == 1 and src.count("ggml_compute_forward_flash_attn_ext_rows") == 1
    assert (tree / patches.OPS).with_name("fa_rows.inc").read_bytes() == patches.KERNEL.read_bytes()
    assert (tree / patches.OPS).with_name("ops.cpp.orig").read_text() == pristine
    assert patches.apply(tree) is False  # already there: nothing rewritten
    assert (tree / patches.OPS).read_text() == src


def test_a_changed_kernel_is_redone_from_the_pristine_source(tree, monkeypatch, tmp_path):
    patches.apply(tree)
    newer = tmp_path / "newer.inc"
    newer.write_text("// a newer kernel\n")
    monkeypatch.setattr(patches, "KERNEL", newer)
    monkeypatch.setattr(patches, "DIGEST", "0123456789")
    assert patches.apply(tree) is True
    src = (tree / patches.OPS).read_text()
    assert src.count("#include") == 1 and '"0123456789"' in src  # one copy of the edits, the new digest
    assert (tree / patches.OPS).with_name("fa_rows.inc").read_text() == "// a newer kernel\n"


def test_a_tree_without_the_anchors_is_refused(tmp_path):
    ops = tmp_path / patches.OPS
    ops.parent.mkdir(parents=True)
    ops.write_text("static void something_else(\n")
    with pytest.raises(patches.PatchError, match="expected one occurrence"):
        patches.apply(tmp_path)


def test_a_library_without_the_kernel_reports_none(tmp_path):
    assert patches.kernel_digest(tmp_path) is None  # no library at all
    (tmp_path / "libggml-cpu.so").write_bytes(b"not a library")
    assert patches.kernel_digest(tmp_path) is None
