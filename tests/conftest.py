import os
import sys
from pathlib import Path

import pytest

# Tests import their helpers as a plain package (tests/helpers/: tiny models, server set-up).
sys.path.insert(0, str(Path(__file__).parent))
# Converted models are cached in the repo's ignored .cache/ unless told otherwise.
os.environ.setdefault("NBKIT_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))
# Every start measures: tests patch clocks and self-checks, and a verdict cached by one must not reach another
# (tests/server/test_startup.py turns the start-up cache on, in a tmp dir).
os.environ["NBKIT_STARTUP_CACHE"] = "off"


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in fp32, loaded once per session."""
    from nbkit.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def embedded_heads(embedded):
    from nbkit.medusa.heads import embedded_heads_dir, load_heads

    if not embedded_heads_dir().exists():
        pytest.fail("the shipped Medusa heads for SmolLM2 are missing (nbkit/medusa/data/smollm2-135m-heads)")
    return load_heads(embedded_heads_dir(), embedded[0].config.hidden_size)


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run on one thread: their ops are too small for a second one to pay, and on a
    loaded 2-core machine OpenMP barriers between two threads cost more than the ops themselves."""
    import torch

    real_model = request.node.get_closest_marker("slow") and not request.node.get_closest_marker("tiny")
    if "embedded" in request.fixturenames or real_model:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The embedded model on one torch thread for a whole module (server runs on a shared 2-core machine:
    two spinning torch threads make a step take 0.1 s or 10 s at random)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vicuna_mirror():
    """A hub-mirror tree with miniatures of lmsys/vicuna-7b-v1.3 and FasterDecoding/medusa-vicuna-7b-v1.3
    (tests/vicuna_mini.py; built once per builder version under $NBKIT_CACHE_DIR). Point
    $NBKIT_HUB_MIRROR at it to load them by their real ids."""
    from vicuna_mini import cached_mirror

    return cached_mirror()
