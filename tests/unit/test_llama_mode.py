"""The llama.cpp mode switch where operators meet it: `nbkit serve --llama-mode` and the notebooks' LLAMA_MODE."""

import argparse
from types import SimpleNamespace

import pytest

from nbkit.notebook.tunnel import serve
from nbkit.server.cli import llama_kwargs, register_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_cli_defaults_to_the_auto_mode():
    # auto: exact on a CPU, fast with GPU offload (the runner decides, nbkit/engine/llamacpp/sizing.py)
    assert parse().llama_mode == "auto"
    assert llama_kwargs(parse("--engine", "llamacpp")) == {"exact": None}
    assert llama_kwargs(parse("--engine", "llamacpp", "--llama-mode", "exact")) == {"exact": True}
    assert llama_kwargs(parse("--engine", "llamacpp", "--llama-mode", "fast")) == {"exact": False}
    assert llama_kwargs(parse("--engine", "torch", "--llama-mode", "fast")) == {}  # the torch engine has no modes
    with pytest.raises(SystemExit):
        parse("--llama-mode", "quick")


def test_notebook_serve_refuses_an_unknown_mode_before_starting_anything():
    with pytest.raises(ValueError, match="LLAMA_MODE must be 'auto', 'exact' or 'fast'"):
        serve(SimpleNamespace(engine="llamacpp"), llama_mode="quick")
