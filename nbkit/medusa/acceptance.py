"""Choosing which speculated tokens to keep after one tree verification.

All three rules are the same walk down the tree: at node n pick a token x from n's logits; x is
emitted; if a child of n carries x the walk moves into it, otherwise it stops. The nodes visited
(root first) are the accepted ones whose KV entries stay; the last x is the "bonus" token, the next
step's root. Plain decoding is the walk on a root-only tree.

- greedy:   x = argmax. Output equals plain greedy decoding.
- sampling: x ~ the target distribution (temperature/top-k/top-p). Lossless: every emitted token is
            an exact sample of the target given what precedes it, as in plain sampling.
- typical:  Medusa's typical acceptance: move into the most likely child whose probability exceeds
            min(posterior_threshold, alpha * exp(-entropy)); else sample x and stop. Faster, not
            distribution-preserving.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .trees import MedusaTree


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Target distribution over the vocabulary (fp32), with temperature, top-k and top-p applied."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[..., 0] = False  # also when top_p rounds to 0 in fp32 (5e-324 did: all dropped, NaN probabilities)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def walk(tree: MedusaTree, tree_tokens: list[int], choose: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """(emitted tokens, accepted nodes) of the walk; `choose(node)` returns the token picked there."""
    emitted: list[int] = []
    accepted = [0]
    node = 0
    while True:
        x = choose(node)
        emitted.append(x)
        child = next((c for c in tree.children[node].values() if tree_tokens[c] == x), None)
        if child is None:
            return emitted, accepted
        accepted.append(child)
        node = child


def accept_greedy(tree: MedusaTree, tree_tokens: list[int], logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """logits [T, V] of every tree node -> (emitted, accepted nodes) under greedy decoding."""
    best = logits.argmax(dim=-1).tolist()
    return walk(tree, tree_tokens, best.__getitem__)


def accept_sampling(
    tree: MedusaTree, tree_tokens: list[int], logits: torch.Tensor, temperature: float,
    top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """Lossless speculative sampling for deterministic (top-k) drafts."""

    def choose(node: int) -> int:
        probs = probs_from_logits(logits[node], temperature, top_p, top_k)
        return int(torch.multinomial(probs, 1, generator=generator))

    return walk(tree, tree_tokens, choose)


def accept_typical(
    tree: MedusaTree, tree_tokens: list[int], logits: torch.Tensor, temperature: float,
    top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
    posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
) -> tuple[list[int], list[int]]:
    """Medusa's typical acceptance (not distribution-preserving)."""

    def choose(node: int) -> int:
        probs = probs_from_logits(logits[node], max(temperature, 1e-5), top_p, top_k)
        entropy = -(probs * torch.log(probs + 1e-10)).sum()
        threshold = min(posterior_threshold, posterior_alpha * float(torch.exp(-entropy)))
        passing = [tree_tokens[c] for c in tree.children[node].values() if probs[tree_tokens[c]] > threshold]
        if passing:
            return max(passing, key=lambda t: float(probs[t]))
        if temperature <= 0:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=generator))

    return walk(tree, tree_tokens, choose)


def accept(tree: MedusaTree, tree_tokens: list[int], logits: torch.Tensor, params,
           generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """(emitted, accepted nodes) under a request's rule: `params` has greedy, acceptance ("typical" or
    lossless sampling), temperature, top_p and top_k (the engine's SamplingParams)."""
    p = params
    if p.acceptance == "typical" and tree.size > 1:
        return accept_typical(tree, tree_tokens, logits, p.temperature, p.top_p, p.top_k, generator)
    if p.greedy:
        return accept_greedy(tree, tree_tokens, logits)
    return accept_sampling(tree, tree_tokens, logits, p.temperature, p.top_p, p.top_k, generator)


def tree_candidates(tree: MedusaTree, root_token: int, head_topk: torch.Tensor | None) -> list[int]:
    """Tree input tokens: the candidate pool [root] + topk(head_0) + ... gathered by tree_indices."""
    if tree.size == 1:
        return [root_token]
    if head_topk is None:
        raise ValueError("a speculative tree needs the heads' top-k candidates")
    pool = torch.cat([torch.tensor([root_token]), head_topk.reshape(-1).cpu()])
    return pool[tree.tree_indices].tolist()
