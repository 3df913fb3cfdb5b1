"""HF folder -> GGUF with the vendored converter, quantization through the bindings, loading in the runner.

A tiny random Llama (vocab of the embedded SmolLM2 tokenizer, whose pre-tokenizer the converter
knows) converted to f32 must give the same first-step logits in llama.cpp (flash attention off, f32 KV:
the most accurate path) as in transformers within 1e-4; its Q8_0 copy must correlate > 0.999.
"""

import os
import time

import pytest
import torch
from helpers import tiny_llama

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

from nbkit.cli import main as nbkit_main
from nbkit.engine.llamacpp.lm_head import gguf_lm_head
from nbkit.engine.llamacpp.runner import LlamaCppRunner
from nbkit.gguf.convert import check_hf_dir, convert, quantize
from nbkit.gguf.files import gguf_tokenizer
from nbkit.models import embedded_gguf_path

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 30, 2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a transformers folder."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=49152, hidden=64, layers=2)
    model.save_pretrained(out)
    gguf_tokenizer(embedded_gguf_path()).save_pretrained(out)
    return out, model


@pytest.fixture(scope="module")
def f32_gguf(hf_dir, tmp_path_factory):
    return convert(hf_dir[0], tmp_path_factory.mktemp("gguf") / "tiny.f32.gguf", outtype="f32")


def _first_step_logits(gguf_file) -> torch.Tensor:
    runner = LlamaCppRunner(gguf_file, max_slots=1, n_ctx=256, hidden=False, exact=False, flash_attn=False,
                            kv_type="f32")
    slot = runner.alloc()
    logits, _ = runner.prefill({slot: PROMPT})[slot]
    runner.close()
    return logits


def _hf_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0, -1].float()


def test_f32_gguf_matches_transformers(hf_dir, f32_gguf):
    ref = _hf_logits(hf_dir[1])
    got = _first_step_logits(f32_gguf)
    assert (got - ref).abs().max() < 1e-4
    assert int(got.argmax()) == int(ref.argmax())
    # The lm_head the Medusa heads use is the GGUF's output weight, dequantized (rounded to fp16).
    head = gguf_lm_head(f32_gguf)
    assert torch.equal(head.weight, hf_dir[1].lm_head.weight.half().float())


def test_q8_0_quantization_through_the_bindings(hf_dir, f32_gguf, tmp_path):
    out = quantize(f32_gguf, tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    assert out.stat().st_size < f32_gguf.stat().st_size / 3
    ref = _hf_logits(hf_dir[1])
    got = _first_step_logits(out)
    assert torch.corrcoef(torch.stack([got, ref]))[0, 1] > 0.999
    mtime = out.stat().st_mtime_ns
    assert quantize(f32_gguf, out, "Q8_0") == out and out.stat().st_mtime_ns == mtime  # done: skipped


def test_cli_convert_f16_then_q8_0_and_skip_when_done(hf_dir, tmp_path, capsys):
    target = tmp_path / "tiny.Q8_0.gguf"
    argv = ["convert", str(hf_dir[0]), "--outtype", "f16", "--quantize", "Q8_0", "--outfile", str(target)]
    assert nbkit_main(argv) == 0
    assert target.is_file() and (tmp_path / f"{hf_dir[0].name}.f16.gguf").is_file()
    first = capsys.readouterr().out
    assert "converting" in first and "quantizing" in first
    t0 = time.monotonic()
    assert nbkit_main(argv) == 0
    assert time.monotonic() - t0 < 2 and "up to date" in capsys.readouterr().out
    ref = _hf_logits(hf_dir[1])
    assert int(_first_step_logits(target).argmax()) == int(ref.argmax())


def test_bad_input_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        check_hf_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        check_hf_dir(tmp_path)
    assert nbkit_main(["convert", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(embedded_gguf_path(), tmp_path / "x.gguf", "Q3_FANCY")
