"""The plan's memory arithmetic against what the torch engine really allocates, for vicuna-7b's and
vicuna-13b's real shapes on a T4, an L4, an A100-40 and an A100-80: models, heads and KV are built on
the `meta` device (shapes, no data) and a verify pass at batch 16 x 64 tokens is measured there."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from nbkit.engine.runner import TreeInput
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.heads import MedusaHeads
from nbkit.medusa.trees import get_tree
from nbkit.notebook import env, memory

GIB = 2**30
VICUNA_13B = {**env.VICUNA_7B, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "intermediate_size": 13824}
MODELS = {"vicuna-7b": env.VICUNA_7B, "vicuna-13b": VICUNA_13B}
CARDS = {  # total memory as torch reports it
    "T4": 15828320256 / GIB, "L4": 23661248512 / GIB, "A100-40": 42298834944 / GIB, "A100-80": 85094825984 / GIB,
}
EXPECTED_ENGINE = {("vicuna-7b", "T4"): "llamacpp", ("vicuna-13b", "T4"): "llamacpp",
                   ("vicuna-13b", "L4"): "llamacpp"}  # every other pair: torch f16


class PeakBytes(TorchDispatchMode):
    """The most bytes that storages made inside the mode held at once: a storage counts from the op that made
    it until the last tensor over it (views included) is gone."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.users: dict[int, int] = {}  # storage -> tensors alive over it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, n = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
            if key not in self.users:
                if key in given:
                    continue  # a view or an in-place result of a tensor made outside (weights, KV)
                self.users[key] = 0
                self.live += n
                self.peak = max(self.peak, self.live)
            self.users[key] += 1
            weakref.finalize(t, self._release, key, n)
        return out

    def _release(self, key: int, n: int) -> None:
        self.users[key] -= 1
        if self.users[key] == 0:
            del self.users[key]
            self.live -= n


def meta_model(shapes: dict) -> LlamaForCausalLM:
    cfg = LlamaConfig(**shapes, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.float16).eval()


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure(shapes: dict, plan: env.Plan) -> dict:
    """GiB the torch engine allocates for `plan`: weights, heads, KV, and the peak of its widest passes at full
    context: a verify of 16 x mc_sim_7b_63 and a prefill of 16 chunks padded to the prefill budget."""
    model = meta_model(shapes)
    with torch.device("meta"):
        heads = MedusaHeads(shapes["hidden_size"], 5, 1, shapes["vocab_size"]).to(torch.float16)
    runner = TorchRunner(model, max_slots=env.MAX_BATCH, kv_budget_bytes=plan.kv_budget_bytes)
    tree = get_tree("mc_sim_7b_63", 5)
    slots = [runner.alloc() for _ in range(env.MAX_BATCH)]
    runner._grow(1)  # the budget's one allocation

    def peak_of(step, used: int) -> float:
        for s in slots:
            runner.lengths[s] = runner.max_context - used  # every row at its longest
        with torch.inference_mode(), PeakBytes() as peak:
            step()
        return peak.peak / GIB

    verify = peak_of(lambda: runner.verify([TreeInput(s, tree, [5] * tree.size) for s in slots]), tree.size)
    chunks = {s: [5] * (memory.PREFILL_TOKENS if i == 0 else 1) for i, s in enumerate(slots)}
    prefill = peak_of(lambda: runner.prefill(chunks), memory.PREFILL_TOKENS)
    return {"weights": nbytes(model) / GIB, "heads": nbytes(heads) / GIB, "kv": runner.kv_bytes() / GIB,
            "workspace": max(verify, prefill), "context": runner.max_context}


def card(name: str) -> env.Environment:
    gib = CARDS[name]
    return env.Environment(colab=True, python="3.12", torch="2", cuda="12.4",
                           gpus=[env.Gpu(name, gib, gib - 0.2, (8, 0))])


@pytest.mark.parametrize("card_name", list(CARDS))
@pytest.mark.parametrize("model_name", [  # the user's model in the quick tier, the larger one in `make test`
    name if name == "vicuna-7b" else pytest.param(name, marks=pytest.mark.slow) for name in MODELS])
def test_the_plan_agrees_with_what_the_torch_engine_allocates(model_name, card_name):
    """The old plan reserved a fixed 8192 tokens of KV (4 GiB) whatever the card, and the runner took none of it."""
    shapes = MODELS[model_name]
    plan = env.resolve_plan(env=card(card_name), sizes=env.sizes_from_shapes(shapes))
    assert plan.fits() and plan.need_gib <= CARDS[card_name]
    assert plan.engine == EXPECTED_ENGINE.get((model_name, card_name), "torch")
    if plan.engine != "torch":  # the llama.cpp side is measured by its own tests; the heads run in torch
        with torch.device("meta"):
            heads = MedusaHeads(shapes["hidden_size"], 5, 1, shapes["vocab_size"])
        assert nbytes(heads.to(torch.float16)) / GIB == pytest.approx(plan.heads_gib, rel=0.05)
        return
    got = measure(shapes, plan)
    assert got["weights"] == pytest.approx(plan.weights_gib, rel=0.05)
    assert got["heads"] == pytest.approx(plan.heads_gib, rel=0.05)
    assert got["kv"] == pytest.approx(plan.kv_gib, rel=0.05) and got["kv"] <= plan.kv_gib
    assert got["workspace"] == pytest.approx(plan.workspace_gib, rel=0.05)
    total = got["weights"] + got["heads"] + got["kv"] + got["workspace"] + env.CUDA_OVERHEAD_GIB
    assert total == pytest.approx(plan.need_gib, rel=0.05)
    assert got["context"] == shapes["max_position_embeddings"] or plan.kv_gib * GIB < (
        env.MAX_BATCH * (shapes["max_position_embeddings"] + 1) * env.sizes_from_shapes(shapes)["kv_mib_per_token"]
        * 2**20)


def test_the_kv_budget_is_what_is_left_not_a_fixed_number_of_tokens():
    l4, a100 = (env.resolve_plan(env=card(n)) for n in ("L4", "A100-40"))
    assert l4.kv_gib < a100.kv_gib  # the old plan gave both 4 GiB
    left = CARDS["L4"] - l4.weights_gib - l4.heads_gib - l4.workspace_gib - env.CUDA_OVERHEAD_GIB
    assert l4.kv_gib == pytest.approx(left)
    assert a100.kv_budget_bytes == int(a100.kv_gib * GIB)


def test_a_plan_for_a_simulated_gpu_gives_the_cpu_engine_no_budget(monkeypatch):
    monkeypatch.setenv("NBKIT_GPU", "NVIDIA A100-SXM4-40GB, 40960, 40000, 8.0")
    facts = env.Environment(colab=False, python="3.11", torch="2", cuda=None, gpus=env.simulated_gpus())
    plan = env.resolve_plan(env=facts)
    assert plan.engine == "torch" and plan.kv_gib > 4 and plan.kv_budget_bytes is None


def test_the_notebook_serve_path_hands_the_plans_budget_to_the_server(monkeypatch):
    """hub.prepare keeps the plan's KV budget and tunnel.serve gives it to start_server (then load_engine)."""
    from nbkit.notebook import hub, tunnel
    from nbkit.server import launch

    plan = env.resolve_plan(env=card("A100-40"))
    prepared = hub.prepare("embedded", "none", plan)
    assert prepared.kv_budget_bytes == plan.kv_budget_bytes > 8 * GIB
    seen = {}

    class Stop(Exception):
        pass

    def fake_start_server(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(launch, "start_server", fake_start_server)
    with pytest.raises(Stop):
        tunnel.serve(prepared, "none", port=0, show=False)
    assert seen["kv_budget_bytes"] == plan.kv_budget_bytes
