"""Acceptance estimates: the running global q[d][r], each request's own, and lower confidence bounds.

q[d][r] is the probability that, having accepted up to depth d, the walk moves into the rank-r
candidate of head d. Both the global and the per-request estimates are counted from "probes": the
heads' top-k at some position, compared with the tokens the request actually produced next.

A request starts knowing nothing about itself: its estimate is shrunk toward the global one,
    q_i[d][r] = (hits_i[d][r] + w_d * q[d][r]) / (trials_i[d] + w_d),   w_d = min(SHRINK, trials[d]),
so a request whose own probes say its prompts are hard stops speculating within a few probes, and one
that has seen nothing speculates only as far as the running global estimate allows. The uncertainty
is kept too: q_i is lowered by Z standard errors (binomial, n = trials_i + w_d), and a tree's expected
tokens are computed from those lower bounds (`TreeTable.lower_bounds`): the gain's lower confidence bound.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ...medusa.trees import TOPK, MedusaTree

# Pseudo-observations of the global estimate's seed: the heads' training-time acceptance when their
# config has one, else a generic guess; either is soon outweighed by real probes (see docs/bench/policy.md).
SEED_TRIALS_MEASURED = 16.0
SEED_TRIALS_GUESS = 4.0
SHRINK = 12.0  # a request's own trials are weighed against this many of the global estimate's
Z = 1.0  # standard errors below the estimate (one-sided, ~84%)


@dataclass(frozen=True)
class Probe:
    """The heads' top-k at one output position, waiting for the tokens that followed it."""

    start: int  # index in the output of the token that follows the pending one
    topk: torch.Tensor  # [n_heads, k] token ids


class AcceptanceStats:
    """The running global q[d][r] over every request served, seeded with a small prior.

    Probes measure every (depth, rank), whatever tree was used, so the statistics stay honest even
    while the policy runs no tree at all.
    """

    def __init__(self, n_heads: int, topk: int = TOPK, prior_trials: float = SEED_TRIALS_GUESS,
                 measured: list[list[float]] | None = None):
        self.n_heads, self.topk = n_heads, topk
        if measured is not None and len(measured) >= n_heads:
            prior = torch.tensor([row[:topk] for row in measured[:n_heads]], dtype=torch.float32)
            prior_trials = SEED_TRIALS_MEASURED
        else:
            # Prior: head d's top-1 is right ~0.6 * 0.7^d of the time, lower ranks much less.
            prior = torch.tensor([[0.6 * 0.7**d / (1 + 2 * r) for r in range(topk)] for d in range(n_heads)])
        self.hits = prior * prior_trials
        self.trials = torch.full((n_heads, topk), prior_trials)
        self.proposed = 0  # tree tokens sent to verification beyond the root
        self.accepted = 0  # of those, accepted
        self._lock = threading.Lock()

    def resolve_probes(self, probes: list[Probe], output_ids: list[int], final: bool,
                       request: RequestAcceptance | None = None) -> list[Probe]:
        """Observe the probes whose next tokens are all known (all of them when the request is `final`),
        globally and for `request`; returns the probes still waiting."""
        keep = []
        for probe in probes:
            actual = output_ids[probe.start:]
            if len(actual) >= self.n_heads or final:
                if actual:
                    self.observe_probe(probe.topk, actual, request)
            else:
                keep.append(probe)
        return keep

    def observe_probe(self, head_topk: torch.Tensor, actual: list[int],
                      request: RequestAcceptance | None = None) -> None:
        """head_topk [n_heads, k] at a position; actual = the tokens that followed the pending token."""
        walk = []  # (depth, rank or None)
        for d, token in enumerate(actual[: self.n_heads]):
            ranks = (head_topk[d] == token).nonzero()
            walk.append((d, int(ranks[0]) if len(ranks) else None))
            if not len(ranks):
                break
        with self._lock:
            for d, rank in walk:
                self.trials[d] += 1
                if rank is not None:
                    self.hits[d, rank] += 1
        if request is not None:
            request.observe(walk)

    def q(self) -> torch.Tensor:
        with self._lock:
            return self.hits / self.trials

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [D, K], trials per depth [D])."""
        with self._lock:
            return self.hits / self.trials, self.trials[:, 0].clone()

    def path_scores(self, tree: MedusaTree) -> dict[tuple[int, ...], float]:
        q = self.q()
        scores = {}
        for p in tree.paths:
            prob = 1.0
            for d, r in enumerate(p):
                prob *= float(q[d, r]) if d < self.n_heads else 0.0
            scores[p] = prob
        return scores

    def expected_tokens(self, tree: MedusaTree) -> float:
        """E(tree) = 1 + sum of path acceptance probabilities (bonus token included)."""
        return 1.0 + sum(self.path_scores(tree).values())

    def snapshot(self) -> dict:
        q = self.q()
        return {
            "top1_by_head": [round(float(q[d, 0]), 4) for d in range(self.n_heads)],
            "proposed_tokens": self.proposed,
            "accepted_tokens": self.accepted,
        }


class RequestAcceptance:
    """One request's own probe counts (hits [D, K], trials [D]); starts empty."""

    def __init__(self, n_heads: int, topk: int = TOPK):
        self.hits = torch.zeros(n_heads, topk)
        self.trials = torch.zeros(n_heads)
        self.version = 0  # bumped by every observation (the policy caches its gains per version)

    def observe(self, walk: list[tuple[int, int | None]]) -> None:
        self.version += 1
        for d, rank in walk:
            self.trials[d] += 1
            if rank is not None:
                self.hits[d, rank] += 1


def shrunk_lower_bounds(q_global: torch.Tensor, n_global: torch.Tensor,
                        requests: list[RequestAcceptance | None]) -> torch.Tensor:
    """[N, D, K] lower confidence bounds of each request's q, shrunk toward the global estimate q_global
    [D, K] (from n_global [D] trials; `AcceptanceStats.counts()`). A request given as None has seen
    nothing of its own."""
    weight = n_global.clamp(max=SHRINK)  # [D]: never trust the global estimate beyond its own evidence
    d, k = q_global.shape
    hits = torch.stack([r.hits if r is not None else torch.zeros(d, k) for r in requests])
    trials = torch.stack([r.trials if r is not None else torch.zeros(d) for r in requests])
    n = (trials + weight)[:, :, None]  # [N, D, 1]
    q = (hits + weight[None, :, None] * q_global) / n
    return (q - Z * (q * (1 - q) / n).sqrt()).clamp(min=0.0)


class TreeTable:
    """The candidate trees as sub-sets of the base tree's paths, for expected tokens of many requests at
    once: E[i, c] = 1 + sum over tree c's paths p of prod_d q_i[d, p_d]."""

    def __init__(self, base: MedusaTree, candidates: list[MedusaTree], n_heads: int, topk: int = TOPK):
        paths = list(base.paths)
        index = {tuple(p): j for j, p in enumerate(paths)}
        depth = max((len(p) for p in paths), default=1)
        ranks = torch.full((len(paths), depth), topk, dtype=torch.long)  # rank topk = "no node": q 1
        zero = torch.zeros(len(paths), dtype=torch.bool)
        for j, p in enumerate(paths):
            ranks[j, : len(p)] = torch.tensor(p, dtype=torch.long)
            zero[j] = len(p) > n_heads or any(r >= topk for r in p)
        self.ranks, self.zero, self.depth = ranks.clamp(max=topk), zero, depth
        member = [[0.0] * len(paths) for _ in candidates]
        for c, tree in enumerate(candidates):
            for p in tree.paths:
                member[c][index[tuple(p)]] = 1.0
        self.member = torch.tensor(member)

    def expected(self, q: torch.Tensor) -> torch.Tensor:
        """q [N, D, K] -> [N, C] expected tokens per step of each candidate tree."""
        n, d, k = q.shape
        ext = torch.ones(n, max(d, self.depth), k + 1)
        ext[:, :d, :k] = q
        depths = torch.arange(self.depth)
        probs = ext[:, depths[None, :], self.ranks].prod(-1)  # [N, P]
        probs[:, self.zero] = 0.0
        return 1.0 + probs @ self.member.T
