"""`python -m nbkit COMMAND`: generate, demo, bench, serve, convert, build, train-heads, export."""

from __future__ import annotations

import argparse
import json
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: embedded SmolLM2)")
    p.add_argument("--heads", default=None, help="Medusa heads folder/file, 'embedded' or 'none'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _sampling(args):
    from .engine.request import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop or [])


def cmd_generate(args) -> int:
    from .engine.loader import load_engine

    speculation = "off" if args.no_medusa else ("adaptive" if args.tree == "auto" else args.tree)
    engine = load_engine("torch", args.model, "none" if args.no_medusa else args.heads, args.device,
                               max_batch=1, speculation=speculation)
    out = engine.generate(args.prompt, _sampling(args), chat=not args.raw)
    tree = engine.speculation.last_choice.name
    if args.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "new_tokens": out.completion_tokens,
            "prompt_tokens": out.prompt_tokens, "steps": out.steps, "mean_accepted": round(out.mean_accepted, 4),
            "tokens_per_s": round(out.tokens_per_s, 2), "finish_reason": out.finish_reason,
            "speculation": speculation, "tree_choices": engine.speculation.choices, "last_tree": tree,
        }))
    else:
        print(out.text)
        print(f"\n[{out.completion_tokens} tokens, {out.steps} steps, {out.mean_accepted:.2f} tokens/step, "
              f"{out.tokens_per_s:.1f} tok/s, finish: {out.finish_reason}, trees: {engine.speculation.choices}]",
              file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .engine.loader import load_engine
    from .engine.request import SamplingParams

    prompts = args.prompt or ["Explain why the sky is blue in three sentences.",
                              "Write a short poem about a lighthouse."]
    plain = load_engine("torch", args.model, "none", args.device, max_batch=1)
    medusa = load_engine("torch", args.model, args.heads, args.device, max_batch=1, speculation=args.tree)
    for prompt in prompts:
        print(f"### {prompt}")
        for name, engine in (("plain", plain), (f"medusa ({args.tree})", medusa)):
            out = engine.generate(prompt, SamplingParams(max_tokens=args.max_tokens), chat=True)
            print(f"--- {name}: {out.completion_tokens} tokens in {out.latency:.2f} s = {out.tokens_per_s:.1f} tok/s, "
                  f"{out.steps} steps, {out.mean_accepted:.2f} tokens/step")
            print(out.text.strip() + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    _quiet_transformers()
    parser = argparse.ArgumentParser(prog="nbkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from one prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--no-medusa", action="store_true", help="plain decoding")
    g.add_argument("--tree", default="auto", help="auto, mc_sim_7b_63, vicuna_7b_stage2, chain-K or none")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the embedded model with and without Medusa, side by side")
    d.add_argument("--prompt", action="append")
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--tree", default="adaptive", help="adaptive, or a fixed tree name")
    _add_model_args(d)
    d.set_defaults(func=cmd_demo)

    for register in _plugins():
        register(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"nbkit {args.command}: error: {err}", file=sys.stderr)
        return 2


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _plugins():
    """Sub-commands that live next to their code (bench, serve, convert, build, train-heads)."""
    import importlib

    for module in ("nbkit.bench.closed_loop", "nbkit.server.cli", "nbkit.gguf.cli", "nbkit.medusa.train",
                   "nbkit.medusa.export"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue  # not written yet
            raise
        yield mod.register_cli


if __name__ == "__main__":
    sys.exit(main())
