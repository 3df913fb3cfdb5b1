"""Medusa token trees: from a list of top-k paths to the buffers a verification step needs.

A path is a tuple of top-k ranks, one per depth: (0, 1) = head 0's top-1 then head 1's top-2.
Node 0 is the root (the token already chosen from the base model's logits); node j+1 is the j-th
path after sorting by (length, path), so parents always come before their children.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import torch

TOPK = 10  # candidates kept per head, as in the Medusa repo


@dataclass(frozen=True)
class MedusaTree:
    """Everything one verification step needs, for one tree shape.

    name:          a label ("mc_sim_7b_63", "chain-3", "none", "mc_sim_7b_63[12]").
    paths:         sorted paths; node j+1 is paths[j].
    tree_indices:  [T] index into the candidate pool [root] + topk(head_0) + topk(head_1) + ...
    depths:        [T] depth of each node (root 0): position offset in the sequence.
    parents:       [T] parent node of each node (-1 for the root).
    attn_mask:     [T, T] bool, node a sees node b iff b is a or an ancestor of a.
    retrieve:      [n_leaves, max_depth + 1] node indices root..leaf, padded with -1.
    children:      per node, {rank at the next depth: child node}.
    """

    name: str
    paths: tuple[tuple[int, ...], ...]
    tree_indices: torch.Tensor
    depths: torch.Tensor
    parents: tuple[int, ...]
    attn_mask: torch.Tensor
    retrieve: torch.Tensor
    children: tuple[dict[int, int], ...] = field(repr=False)

    @property
    def size(self) -> int:
        """T: tokens verified per step (root included)."""
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def n_leaves(self) -> int:
        return self.retrieve.shape[0]

    def depth_counts(self) -> list[int]:
        """Nodes per depth, root excluded: [10, 28, 23, 2] for mc_sim_7b_63."""
        counts = [0] * self.max_depth
        for p in self.paths:
            counts[len(p) - 1] += 1
        return counts


def build_tree(paths: list[list[int]] | list[tuple[int, ...]], name: str = "custom", topk: int = TOPK) -> MedusaTree:
    """Tree buffers from a list of paths (every prefix of a path must be a path itself)."""
    ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    node_of = {(): 0}
    for j, p in enumerate(ordered):
        if not p:
            raise ValueError("empty path: the root is implicit")
        if p[:-1] not in node_of:
            raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])} in the tree")
        if not 0 <= p[-1] < topk:
            raise ValueError(f"path {list(p)} uses rank {p[-1]}, outside top-{topk}")
        node_of[p] = j + 1
    size = len(ordered) + 1
    tree_indices = [0] + [1 + topk * (len(p) - 1) + p[-1] for p in ordered]
    depths = [0] + [len(p) for p in ordered]
    parents = [-1] + [node_of[p[:-1]] for p in ordered]
    children: list[dict[int, int]] = [dict() for _ in range(size)]
    for p in ordered:
        children[node_of[p[:-1]]][p[-1]] = node_of[p]
    attn_mask = torch.zeros(size, size, dtype=torch.bool)
    for node in range(size):
        a = node
        while a != -1:
            attn_mask[node, a] = True
            a = parents[a]
    leaves = [n for n in range(size) if not children[n]]
    max_depth = max(depths)
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        chain, a = [], leaf
        while a != -1:
            chain.append(a)
            a = parents[a]
        retrieve[row, : len(chain)] = torch.tensor(chain[::-1])
    return MedusaTree(
        name=name, paths=tuple(ordered), tree_indices=torch.tensor(tree_indices), depths=torch.tensor(depths),
        parents=tuple(parents), attn_mask=attn_mask, retrieve=retrieve, children=tuple(children),
    )


@cache
def chain(k: int) -> MedusaTree:
    """A chain of k speculated tokens (each head's top-1); chain(0) is plain decoding. Cached (as are
    `get_tree`'s): the engine asks for every request's tree every step, and a tree is read-only."""
    return build_tree([[0] * d for d in range(1, k + 1)], name=f"chain-{k}" if k else "none")


@cache
def published_paths() -> dict[str, list[list[int]]]:
    """The published Medusa trees shipped as package data (medusa_trees.json)."""
    text = resources.files("nbkit.medusa").joinpath("data/medusa_trees.json").read_text()
    return json.loads(text)


@cache
def get_tree(name: str, n_heads: int | None = None) -> MedusaTree:
    """A tree by name: a published one ('mc_sim_7b_63', 'vicuna_7b_stage2'), 'chain-K', or 'none'.

    With n_heads, paths deeper than the available heads are dropped (a 4-deep tree on 3 heads).
    """
    if name == "none":
        return chain(0)
    if name.startswith("chain-"):
        try:
            k = int(name.split("-", 1)[1])
        except ValueError:
            raise ValueError(f"bad chain name {name!r}: use chain-K with K an integer") from None
        if k < 0 or (n_heads is not None and k > n_heads):
            raise ValueError(f"{name} needs {k} heads; there are {n_heads}")
        return chain(k)
    trees = published_paths()
    if name not in trees:
        raise ValueError(f"unknown tree {name!r}: choose from {sorted(trees)}, chain-K or none")
    paths = trees[name]
    if n_heads is not None:
        paths = [p for p in paths if len(p) <= n_heads]
    return build_tree(paths, name=name)


def subtree(tree: MedusaTree, path_scores: dict[tuple[int, ...], float], n_nodes: int) -> MedusaTree:
    """The best prefix-closed sub-tree of `tree` with `n_nodes` speculated nodes.

    path_scores[p] estimates the probability that path p is accepted. Nodes are added greedily
    from the frontier (children of nodes already chosen), highest score first: the same rule the
    Medusa authors used to grow their trees, applied to our own measured acceptance.
    """
    chosen: list[tuple[int, ...]] = []
    have = {()}
    frontier = [p for p in tree.paths if len(p) == 1]
    while frontier and len(chosen) < n_nodes:
        best = max(frontier, key=lambda p: (path_scores.get(p, 0.0), -len(p), [-r for r in p]))
        frontier.remove(best)
        chosen.append(best)
        have.add(best)
        frontier += [p for p in tree.paths if len(p) == len(best) + 1 and p[:-1] == best]
    return build_tree(chosen, name=f"{tree.name}[{len(chosen)}]")
