"""The converter's output reaches the notebook cell while it runs (no minutes of captured silence)."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import pytest

from nbkit.gguf import build, convert

# Prints a first line, then waits until the reader has seen it: if the output were captured until exit,
# the marker would never appear and the script would fail.
SLOW_CONVERTER = textwrap.dedent("""
    import pathlib, sys, time
    args = sys.argv[1:]
    out = pathlib.Path(args[args.index("--outfile") + 1])
    marker = pathlib.Path(sys.argv[0]).with_name("seen")
    print("INFO:hf-to-gguf:blk.0.attn_q.weight, torch.float16 --> Q8_0", flush=True)
    sys.stderr.write("Writing:  50%|#####     | 1.00M/2.00M\\r")
    sys.stderr.flush()
    for _ in range(400):
        if marker.exists():
            break
        time.sleep(0.05)
    else:
        print("nobody read my progress", flush=True)
        sys.exit(4)
    sys.stderr.write("Writing: 100%|##########| 2.00M/2.00M\\n")
    out.write_bytes(b"GGUF")
""")


class Cell(io.StringIO):
    """Stands in for a notebook cell's stdout; drops the marker as soon as the first line arrives."""

    def __init__(self, marker):
        super().__init__()
        self.marker = marker

    def write(self, text):
        if "blk.0.attn_q.weight" in text:
            self.marker.write_text("")
        return super().write(text)


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 16}))
    (model / "tokenizer.model").write_bytes(b"x")
    (model / "pytorch_model.bin").write_bytes(b"x")
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    monkeypatch.setattr(build, "vendor_dir", lambda: vendor)
    return model, vendor


def test_converter_output_streams_while_it_runs(hf_dir, tmp_path, monkeypatch):
    model, vendor = hf_dir
    (vendor / "convert_hf_to_gguf.py").write_text(SLOW_CONVERTER)
    cell = Cell(vendor / "seen")
    monkeypatch.setattr(sys, "stdout", cell)
    out = convert.to_gguf(model, tmp_path / "out" / "m.q8_0.gguf", "q8_0")
    assert out.read_bytes() == b"GGUF"
    shown = cell.getvalue()
    assert "Writing:  50%" in shown and "Writing: 100%" in shown and "\r" in shown  # tqdm redraws in place
    assert "nobody read my progress" not in shown


def test_a_failing_converter_shows_its_last_lines(hf_dir, tmp_path):
    model, vendor = hf_dir
    (vendor / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('INFO: loading')\nprint('NotImplementedError: Architecture X not supported', "
        "file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match="(?s)exit 1.*Architecture X not supported"):
        convert.to_gguf(model, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.tmp").exists()


def test_stream_returns_status_and_tail(capsys):
    rc, tail = convert.stream([sys.executable, "-c", "print('a'); print('b\\r c'); raise SystemExit(3)"])
    assert rc == 3 and tail == ["a", "b", " c"]
    assert capsys.readouterr().out == "a\nb\r c\n"
