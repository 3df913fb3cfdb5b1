"""Tiny models and tokenizers for tests that must run in seconds."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nbkit.medusa.heads import MedusaHeads


class ToyTokenizer:
    """One printable character per token id; id 1 is EOS. Enough for the engine's text handling."""

    eos_token_id = 1
    pad_token_id = 0
    eos_token = "<eos>"
    chat_template = "toy"  # a tokenizer with a template: apply_chat_template below is what it renders

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x41 + (i % 58)) for i in ids if not (skip_special_tokens and i in (0, 1)))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 200) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        return [2] + self(messages[-1]["content"])["input_ids"] + [3]


def tiny_llama(seed: int = 0, vocab_size: int = 256, layers: int = 2, hidden: int = 64, init: float = 0.15,
               max_positions: int = 1024) -> LlamaForCausalLM:
    """A random Llama whose logits are spread out enough that greedy ties are practically impossible."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=init, eos_token_id=1, bos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def random_heads(model, n_heads: int = 4, seed: int = 0, scale: float = 0.05) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(model.config.hidden_size, n_heads)
    for p in heads.parameters():
        p.data.normal_(0, scale)
    return heads.to(model.dtype).eval().requires_grad_(False)  # the runner's dtype, as the loader does


@torch.inference_mode()
def dtype_noise(model, sequences: list[list[int]]) -> float:
    """The largest logit error of `model`'s dtype against the same weights in float32 over `sequences` (0.0 for a
    float32 model): how far rounding alone may move a logit on one computation path."""
    if model.dtype == torch.float32:
        return 0.0
    exact = copy.deepcopy(model).float()
    return max(float((model(torch.tensor([s])).logits.float() - exact(torch.tensor([s])).logits).abs().max())
               for s in sequences)


@torch.inference_mode()
def assert_greedy_matches(model, prompt: list[int], got: list[int], ref: list[int], noise: float) -> None:
    """got == ref (plain greedy in the same dtype), or they part at a near-tie: there the plain top-2 margin is
    within 2 x `noise` (each path rounds within `noise` of float32, so two paths may order a pair that close
    either way) and the two tokens are the plain top-2. After a parting the continuations legitimately differ.
    In float32 (noise 0) only exact equality passes."""
    if got == ref:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    assert i is not None, f"one output is a prefix of the other: {got} vs {ref}"
    logits = model(torch.tensor([prompt + ref[:i]])).logits[0, -1].float()
    top = logits.topk(2)
    margin = float(top.values[0] - top.values[1])
    assert {got[i], ref[i]} == set(top.indices.tolist()) and margin <= 2 * noise, (
        f"token {i}: {got[i]} against plain {ref[i]}, top-2 margin {margin:.4f} > 2 x noise {noise:.4f}")


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=1, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


class OracleHeads(MedusaHeads):
    """Heads that know the true greedy continuation of registered sequences (found by hidden state).

    They put the right token at varying ranks and sometimes miss, so verification accepts paths of
    every length: the hardest case for KV compaction and the one random heads never reach.
    """

    def __init__(self, model, n_heads: int = 4, miss_every: int = 5):
        super().__init__(model.config.hidden_size, n_heads)
        self.model, self.miss_every = model, miss_every
        # Hidden states of one position computed by two paths (registration, the engine) agree to about the
        # dtype's rounding: 1e-3 in float32, a few eps in float16/bfloat16.
        self.tolerance = max(1e-3, 4 * torch.finfo(model.dtype).eps)
        self.keys: list[torch.Tensor] = []
        self.futures: list[list[int]] = []

    @torch.inference_mode()
    def register(self, prompt_ids: list[int], continuation: list[int]) -> None:
        seq = prompt_ids + continuation
        hidden = self.model.model(input_ids=torch.tensor([seq])).last_hidden_state[0]
        for t in range(len(prompt_ids) - 1, len(seq)):
            self.keys.append(hidden[t])
            self.futures.append(seq[t + 2 : t + 2 + self.n_heads])

    @torch.inference_mode()
    def topk(self, hidden, lm_head, k):
        gen = torch.Generator().manual_seed(int(hidden.float().abs().sum() * 1000) % 2**31)
        out = torch.randint(2, self.model.config.vocab_size, (hidden.shape[0], self.n_heads, k), generator=gen)
        if not self.keys:
            return out
        keys = torch.stack(self.keys)
        for row, h in enumerate(hidden):
            dist = (keys - h).norm(dim=-1)
            j = int(dist.argmin())
            if dist[j] > self.tolerance * (1 + h.norm()):
                continue
            for d, token in enumerate(self.futures[j]):
                if (j + d) % self.miss_every == 0 and d > 0:
                    continue  # a miss: the walk stops here
                rank = (j + d) % 3
                out[row, d][out[row, d] == token] = 0 if token != 0 else 2
                out[row, d, rank] = token
        return out


class SlotState:
    """What a fault sees of one slot: the prompt prefilled so far and the tokens emitted before this pass."""

    def __init__(self, slot: int):
        self.slot = slot
        self.prompt_ids: list[int] = []
        self.n_output = 0


class _Poisoned:
    """Logits that raise `err` when acceptance reads them: the failure lands inside that one request."""

    def __init__(self, err: Exception):
        self._err = err

    def __getattr__(self, name):
        raise self._err

    def __getitem__(self, key):
        raise self._err


class FaultyRunner:
    """A runner wrapper for fault tests: `fault(state)` runs for every slot of every pass's results.

    It may sleep (slow steps), raise an Exception (that request fails, as a sampling failure would) or
    raise a BaseException (it escapes the engine's per-request handling and kills the engine thread).
    Everything else is the wrapped runner's.
    """

    def __init__(self, runner):
        self.inner = runner
        self.fault = None
        self.states: dict[int, SlotState] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fresh(self, max_slots=None) -> FaultyRunner:
        return FaultyRunner(self.inner.fresh(max_slots))

    def alloc(self) -> int:
        slot = self.inner.alloc()
        self.states[slot] = SlotState(slot)
        return slot

    def prefill(self, chunks):
        for slot, chunk in chunks.items():
            self.states[slot].prompt_ids += list(chunk)
        return self._inject(self.inner.prefill(chunks), first=True)

    def verify(self, batch):
        return self._inject(self.inner.verify(batch))

    def synchronize(self) -> None:
        self.inner.synchronize()

    def commit(self, accepted) -> None:
        self.inner.commit(accepted)
        for slot, nodes in accepted.items():
            self.states[slot].n_output += len(nodes)  # the accepted nodes are the tokens emitted this step

    def _inject(self, results, first: bool = False):
        for slot, (_logits, hidden) in list(results.items()):
            state = self.states[slot]
            if not first and state.n_output == 0:
                state.n_output = 1  # the prefill's token
            if self.fault is None:
                continue
            try:
                self.fault(state)
            except Exception as err:
                results[slot] = (_Poisoned(err), hidden)
        return results


def head0_stats(q00: float):
    """Global acceptance statistics of 4 heads seeded with head 0's top-1 at q00 and nothing else."""
    from nbkit.engine.speculation.estimates import AcceptanceStats

    return AcceptanceStats(4, measured=[[q00] + [0.0] * 9] + [[0.0] * 10] * 3)


def observed(n: int, hit_rate: float):
    """A request's own acceptance counts after n probes of head 0, the first n x hit_rate of them hits."""
    from nbkit.engine.speculation.estimates import RequestAcceptance

    req = RequestAcceptance(4)
    for i in range(n):
        req.observe([(0, 0)] if i < n * hit_rate else [(0, None)])
    return req


class RunnerWrapper:
    """A runner that hands everything to `inner` except what a subclass overrides (injected faults)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class NonRootNoise(RunnerWrapper):
    """A tree mask bug: every tree node below the root sees something it should not (its logits move)."""

    def __init__(self, inner, amount: float = 1.0):
        super().__init__(inner)
        self.amount = amount

    def verify(self, batch):
        out = self.inner.verify(batch)
        for slot, (logits, hidden) in out.items():
            logits = logits.clone()
            bump = torch.linspace(-self.amount, self.amount, logits.shape[-1])
            logits[1:] += bump[torch.randperm(logits.shape[-1], generator=torch.Generator().manual_seed(slot))]
            out[slot] = (logits, hidden)
        return out
