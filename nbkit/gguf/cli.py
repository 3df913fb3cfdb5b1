"""`python -m nbkit build` and `python -m nbkit convert`: llama.cpp for this machine, and GGUF files."""

from __future__ import annotations

import argparse


def cmd_build(args) -> int:
    from .build import TOOLS, BuildError, build_tools, install_bindings

    if args.tools == []:
        args.tools = list(TOOLS)
    try:
        install_bindings(cuda=args.cuda, cuda_arch=args.cuda_arch, force=args.force, cache=args.wheel_cache)
        if args.tools:
            bin_dir = build_tools(tuple(args.tools), cuda=args.cuda, cuda_arch=args.cuda_arch)
            print(f"[nbkit build] tools in {bin_dir}")
    except BuildError as err:
        print(f"nbkit build: error: {err}")
        return 1
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    out = convert(args.hf_dir, args.outfile, outtype=args.outtype, quantize_to=args.quantize)
    print(out)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build llama-cpp-python (and optionally llama.cpp tools) for this machine")
    b.add_argument("--cuda", action="store_true", help="CUDA build (architecture detected from the GPU)")
    b.add_argument("--cuda-arch", default=None,
                   help="CUDA architecture instead of detecting it: 75 T4, 80 A100, 90 H100")
    b.add_argument("--tools", nargs="*", default=None, metavar="TARGET",
                   help="also build CMake tools (default with no names: llama-quantize llama-server)")
    b.add_argument("--force", action="store_true", help="reinstall the bindings even if they are already there")
    b.add_argument("--wheel-cache", default=None, metavar="DIR",
                   help="reuse a wheel saved here by an earlier session, and save a new build here (e.g. Google "
                        "Drive: /content/drive/MyDrive/nbkit/wheels)")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("convert", help="convert a transformers folder to GGUF (and quantize it)")
    c.add_argument("hf_dir", help="transformers model folder (config.json, weights, tokenizer)")
    c.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    c.add_argument("--quantize", default=None, help="quantize afterwards: Q8_0, Q4_K_M, Q4_0, Q5_K_M, Q6_K ...")
    c.add_argument("--outfile", default=None, help="output file (default: $NBKIT_CACHE_DIR/gguf/NAME.TYPE.gguf)")
    c.set_defaults(func=cmd_convert)

