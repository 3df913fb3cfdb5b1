"""Shared set-up for the server tests: a tiny engine (random Llama + heads) and reference answers.

Imported by the tests in tests/server/ (plain functions: each test module builds its own fixtures
from them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch

from nbkit.client import sse_events
from nbkit.engine.engine import Engine
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.server.launch import start_server

from . import FaultyRunner, ToyTokenizer, random_heads, tiny_llama

TINY_MODEL = "tiny-llama"


def wait_for(condition, timeout: float = 5.0) -> bool:
    """Poll `condition` every 20 ms until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def embedded_engine(max_batch: int = 4, max_queue: int = 8) -> Iterator[Engine]:
    """A started engine on the embedded SmolLM2 (body of a module fixture: `yield from embedded_engine()`)."""
    from nbkit.engine.loader import load_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: see test_reliability_faults.py
    engine = load_engine("torch", max_batch=max_batch, max_queue=max_queue,
                               cost_model=CostModel.from_function(lambda n: 0.03 + 0.0015 * n))
    engine.start()
    yield engine
    engine.stop()
    torch.set_num_threads(threads)


def tiny_engine(max_batch: int = 8, max_queue: int = 64, speculation: str = "adaptive") -> Engine:
    """A not-yet-started engine over a random 2-layer Llama with 4 random Medusa heads (steps take ms).

    Its runner is a FaultyRunner: tests slow it down or break it with `engine.runner.fault = ...`."""
    model = tiny_llama()
    return Engine(FaultyRunner(TorchRunner(model, max_slots=max_batch)), ToyTokenizer(), random_heads(model),
                  speculation=speculation, max_queue=max_queue, model_name=TINY_MODEL,
                  cost_model=CostModel.from_function(lambda n: 0.01 + 0.001 * n))


_reference_model = None


@contextmanager
def tiny_server(**settings):
    """A server on 127.0.0.1 (a free port) over a fresh tiny engine, stopped at the end (module fixtures)."""
    handle = start_server(tiny_engine(), port=0, **settings)
    try:
        yield handle
    finally:
        handle.stop()


def reference_text(prompt_ids: list[int], max_new_tokens: int) -> str:
    """Hugging Face greedy `generate` on a copy of the tiny model: what every greedy answer must equal."""
    global _reference_model
    if _reference_model is None:
        _reference_model = tiny_llama()  # same seed, same weights as tiny_engine's; never used by an engine
    out = _reference_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=1, pad_token_id=0)
    return ToyTokenizer().decode(out[0, len(prompt_ids):].tolist())


def sse_data(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded where they are JSON."""
    return list(sse_events(response.iter_lines()))
