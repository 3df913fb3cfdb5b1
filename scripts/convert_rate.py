"""How fast nbkit's converter turns vicuna-7b-v1.3's files into the T4's Q8_0 GGUF, measured on this machine.

Writes a random-weights model with vicuna-7b-v1.3's tensor shapes (hidden 4096, FFN 11008, vocabulary 32000,
the same config.json keys, fp16 `pytorch_model-*.bin` shards like the real repository) but only `--layers`
of its 32 layers, converts it with `nbkit.gguf.convert.convert(..., outtype="q8_0")` (the vendored
convert_hf_to_gguf.py in a child Python, as the notebooks run it), and prints one JSON line: input and output
MB, wall seconds, the child's CPU seconds, MB/s of input and of output, and the load average around the run.
Every tensor but the embeddings has the real model's shape, so the per-byte rate carries over to the full
13.5 GB of vicuna-7b (the embeddings and lm_head are the same size in both).

    PYTHONPATH=. python scripts/convert_rate.py [--layers 2] [--work /tmp/convert-rate]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

HIDDEN, FFN, VOCAB, FULL_LAYERS = 4096, 11008, 32000, 32  # vicuna-7b-v1.3


def _shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (FFN, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, FFN)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_model(out: Path, layers: int) -> int:
    """vicuna-7b-v1.3's layout with `layers` layers of random fp16 weights; returns the weights' bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import vicuna_mini

    out.mkdir(parents=True, exist_ok=True)
    vicuna_mini.write_base(out, torch.nn.Linear(1, 1), vicuna_mini.train_tokenizer(vicuna_mini.corpus()))
    for shard in out.glob("pytorch_model*"):  # the miniature's weights: replaced below
        shard.unlink()
    config = {**vicuna_mini.vicuna_config(), "hidden_size": HIDDEN, "intermediate_size": FFN,
              "num_attention_heads": 32, "num_hidden_layers": layers, "vocab_size": VOCAB}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(0)
    names = list(_shapes(layers).items())
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        file = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
        state = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.float16) for k, s in shard}
        torch.save(state, out / file)
        total += sum(t.numel() * 2 for t in state.values())
        weight_map.update({k: file for k in state})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}) + "\n")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="of vicuna-7b's 32 (2: 1.3 GB of input)")
    parser.add_argument("--work", default="/tmp/convert-rate", help="scratch folder (removed at the end)")
    args = parser.parse_args(argv)
    from nbkit.gguf.convert import convert

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    try:
        weights = write_model(work / "vicuna-7b-shape", args.layers)
        load_before = os.getloadavg()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        gguf = convert(work / "vicuna-7b-shape", outfile=work / "out.Q8_0.gguf", outtype="q8_0")
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        mb_in, mb_out = weights / 1e6, gguf.stat().st_size / 1e6
        print(json.dumps({
            "layers": args.layers, "input_mb": round(mb_in), "output_mb": round(mb_out), "wall_s": round(wall, 1),
            "child_cpu_s": round(cpu, 1), "input_mb_per_s": round(mb_in / wall, 1),
            "output_mb_per_s": round(mb_out / wall, 1), "loadavg_1min_before_after": [
                round(load_before[0], 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
