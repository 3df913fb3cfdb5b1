"""Accepted tokens per step of greedy Medusa decoding, simulated on plain greedy answers.

Greedy Medusa emits exactly the plain greedy tokens, so the positions it visits are known in advance:
a step at answer position i (whose hidden state gave answer token a_i, the step's root) verifies the
tree built from the heads' top-k at i, accepts the longest tree path whose tokens equal a_{i+1}, ...,
a_{i+L}, and emits L + 1 tokens (the path and the bonus token); the next step starts at i + L + 1.
The first token comes from the prefill and is not counted, as in the engine's figures. Only the heads
run (no verification forward), so this costs seconds where the engine costs minutes on a CPU; the
engine's own count can differ at numerical near-ties only (the hidden states here are stored in bf16).
"""

from __future__ import annotations

import torch

from .trees import MedusaTree


def acceptance_lengths(candidates: torch.Tensor, next_tokens: torch.Tensor, seq_end: torch.Tensor,
                       tree: MedusaTree) -> torch.Tensor:
    """[N] tree path length L accepted by a step rooted at each position.

    candidates [N, heads, k]: the heads' top-k token ids at each position; next_tokens [N]: the greedy
    token that follows each position; seq_end [N]: one past the last position of the same answer."""
    n = len(next_tokens)
    depth = min(tree.max_depth, candidates.shape[1])
    match = torch.zeros(n, depth, candidates.shape[2], dtype=torch.bool)
    for d in range(depth):  # head d at position i proposes a_{i+1+d} = next_tokens[i + 1 + d]
        target = torch.arange(n) + 1 + d
        valid = target < seq_end
        actual = next_tokens[target.clamp(max=n - 1)]
        match[:, d] = (candidates[:, d] == actual[:, None]) & valid[:, None]
    best = torch.zeros(n, dtype=torch.long)
    for path in tree.paths:
        if len(path) <= depth:
            hit = torch.ones(n, dtype=torch.bool)
            for d, rank in enumerate(path):
                hit &= match[:, d, rank]
            best = torch.where(hit, torch.clamp(best, min=len(path)), best)
    return best


def simulate_steps(lengths: torch.Tensor, seq_end: torch.Tensor) -> tuple[int, int]:
    """(tokens emitted after the first, verification steps) over every answer, walking each from its start."""
    tokens = steps = 0
    ends = seq_end.tolist()
    lengths_list = lengths.tolist()
    start = 0
    while start < len(ends):
        end = ends[start]
        i = start
        while i < end - 1:  # tokens a_{start+1} .. a_{end-1} remain to be emitted
            emitted = min(lengths_list[i] + 1, end - 1 - i)
            tokens += emitted
            steps += 1
            i += emitted
        start = end
    return tokens, steps


@torch.inference_mode()
def simulated_per_step(hidden: torch.Tensor, next_tokens: torch.Tensor, seq_end: torch.Tensor, heads, lm_head,
                       tree: MedusaTree, batch_size: int = 2048) -> dict:
    """Simulated greedy Medusa on answers' features (train.Features fields): tokens, steps, tokens per step."""
    from .trees import TOPK

    candidates = torch.cat([heads.topk(hidden[s : s + batch_size].float(), lm_head, TOPK)
                            for s in range(0, len(hidden), batch_size)])
    tokens, steps = simulate_steps(acceptance_lengths(candidates, next_tokens, seq_end, tree), seq_end)
    return {"tokens": tokens, "steps": steps, "per_step": round(tokens / max(steps, 1), 3)}
