"""Log-probabilities of the emitted tokens: OpenAI's logprobs / top_logprobs, TGI's details.tokens[].logprob and
top_n_tokens.

Emitted token i is reported under the target model's distribution at the node whose next token it is: the
prefill's last row for a request's first token, then the tree's root and each accepted node of every step (the
rows acceptance.walk chose from). The verified rows are the target model's own, so the numbers are the same with
and without speculation, within the float noise of the runner's dtype.

The distribution is the one the sampler draws from, as OpenAI defines logprobs: logits / temperature, then
top-k and top-p (a token they exclude has log-probability -inf), then log-softmax. A greedy request (temperature
0) reports the model's raw distribution, log_softmax(logits), whose most likely token is the one emitted.
Typical acceptance reports the same distribution (it is the target's, even though that rule does not sample it).

Only requests that ask pay for this (SamplingParams.logprobs); the rest see one attribute check per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log-probability and the most likely tokens at its position (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), SamplingParams.top_logprobs of them


def processed_logprobs(rows: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Log-probabilities [n, V] (fp32) of the distribution acceptance.probs_from_logits samples from: the same
    temperature, the same top-k cut and the same top-p rule (the smallest prefix whose mass reaches top_p,
    the first token always kept), in log space so that small probabilities keep their precision.
    temperature <= 0: the raw distribution."""
    if temperature <= 0.0:
        return torch.log_softmax(rows.float(), dim=-1)
    scaled = rows.float() / max(temperature, 1e-5)  # the sampler's floor: a tiny temperature must not overflow
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[..., -1, None]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.softmax(scaled, dim=-1).sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[..., 0] = False
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def token_logprobs(logits: torch.Tensor, nodes: list[int], emitted: list[int], params) -> list[TokenLogprob]:
    """The emitted tokens' entries from the verified rows `logits` [T, V]: emitted[i] was chosen at nodes[i].
    `params`: the request's SamplingParams; [] when it did not ask for logprobs (nothing is computed)."""
    if not params.logprobs:
        return []
    index = torch.tensor(nodes, device=logits.device)
    logp = processed_logprobs(logits.index_select(0, index), params.temperature, params.top_p, params.top_k)
    chosen = logp.gather(1, torch.tensor(emitted, device=logp.device)[:, None])[:, 0].tolist()
    if params.top_logprobs == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(emitted, chosen)]
    top = logp.topk(min(params.top_logprobs, logp.shape[-1]), dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(ids, values)))
            for t, lp, ids, values in zip(emitted, chosen, top.indices.tolist(), top.values.tolist())]
