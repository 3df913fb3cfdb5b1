"""The start-up self-check on llama.cpp: a tiny random GGUF passes in exact and fast mode, and a tree
bug in the runner fails it. The tiny model is gpu_check's (head size 32: exact mode's q8_0 V cache needs it)."""

import os

import pytest
import torch

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

from helpers import NonRootNoise

from nbkit.bench.random_model import build
from nbkit.engine.llamacpp.runner import LlamaCppRunner
from nbkit.engine.selfcheck import check_runner
from nbkit.gguf.convert import convert
from nbkit.medusa.heads import MedusaHeads
from nbkit.medusa.trees import get_tree

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 40, 41, 42]]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny")
    build(work / "hf", "tiny", "cpu", torch.float32)
    return convert(work / "hf", work / "tiny.Q8_0.gguf", outtype="f16", quantize_to="Q8_0")  # what a T4 serves


@pytest.mark.parametrize("exact", [True, False])
def test_a_tiny_gguf_passes(tiny_gguf, exact):
    runner = LlamaCppRunner(tiny_gguf, max_slots=2, exact=exact)
    try:
        check = check_runner(runner, MedusaHeads(128, 4), get_tree("mc_sim_7b_63", 4), PROMPTS)
    finally:
        runner.close()
    assert check.passed, check.to_dict()
    assert set(check.runs) == {"plain_batched", "tree_alone", "tree_batched"}
    if exact:  # the exact mode's promise: bit-identical logits whatever the tree and the batch (Q8_0 weights)
        assert check.max_abs_diff == 0.0, check.to_dict()


def test_a_tree_bug_fails(tiny_gguf):
    runner = LlamaCppRunner(tiny_gguf, max_slots=2, exact=True)
    try:
        check = check_runner(NonRootNoise(runner), MedusaHeads(128, 4), get_tree("mc_sim_7b_63", 4), PROMPTS)
    finally:
        runner.close()
    assert not check.passed and check.runs["plain_batched"].passed and not check.runs["tree_alone"].passed
