"""A step's trees cut to the runner's budgets: sequence ids for tree leaves and tokens per forward pass.

llama.cpp verifies every row's tree in ONE decode: each multi-leaf tree borrows a sequence id per leaf (256
in a context, less the slots' own), and the batch holds at most n_batch tokens. The policy's adaptive
choice respects the leaf budget, but a fixed tree (mc_sim_7b_63 has 42 leaves) or a request's own tree does
not: 6 rows of it exceed the free ids, 16 rows exceed n_batch. Cutting a tree is lossless (verification
accepts only what the base model would emit): the largest tree is cut first, one rung at a time, down a
ladder of prefix-closed sub-trees (a prefix of its nodes in build_tree's order: parents come first), then
chains, then no speculation.
"""

from __future__ import annotations

from functools import cache

from ..medusa.trees import MedusaTree, build_tree, chain

PREFIX_SIZES = (32, 16, 8, 4)  # speculated nodes of the cut trees


def ladder(tree: MedusaTree) -> tuple[MedusaTree, ...]:
    """`tree`, then smaller trees that fit inside it: node prefixes, chains of its depth down to 1, none."""
    return (tree,) + _cuts(tree.name, tree.paths)[1:]


@cache
def _cuts(name: str, paths: tuple[tuple[int, ...], ...]) -> tuple[MedusaTree, ...]:
    """The ladder of the tree `paths` (cached: the engine asks every step; trees are read-only)."""
    tree = build_tree(list(paths), name=name) if paths else chain(0)
    rungs = [tree]
    for n in PREFIX_SIZES:
        if n < len(tree.paths):
            rungs.append(build_tree(list(tree.paths[:n]), name=f"{tree.name}[:{n}]"))
    depth = tree.max_depth if all((0,) * d in tree.paths for d in range(1, tree.max_depth + 1)) else 0
    rungs += [chain(k) for k in range(depth, 0, -1) if chain(k).size < rungs[-1].size or len(rungs) == 1]
    rungs.append(chain(0))
    unique = {r.name: r for r in rungs if r.size <= tree.size}  # no duplicates, never larger
    return tuple(unique.values())


def _leaf_ids(tree: MedusaTree) -> int:
    """Sequence ids a tree borrows (a chain verifies in its slot's own sequence)."""
    return tree.n_leaves if tree.n_leaves > 1 else 0


def fit_trees(trees: list[MedusaTree], carried: list[int], max_tokens: int | None,
              max_leaves: int | None) -> list[MedusaTree]:
    """The trees, cut until the step's tokens (trees + `carried` tokens decoded again) fit `max_tokens` and their
    borrowed sequence ids fit `max_leaves` (None: no such limit)."""
    trees = list(trees)
    rung = [0] * len(trees)
    rungs = [ladder(t) for t in trees]

    def over() -> str | None:
        if max_leaves is not None and sum(map(_leaf_ids, trees)) > max_leaves:
            return "leaves"
        if max_tokens is not None and sum(t.size for t in trees) + sum(carried) > max_tokens:
            return "tokens"
        return None

    while (why := over()) is not None:
        cuttable = [i for i in range(len(trees)) if rung[i] + 1 < len(rungs[i])]
        if not cuttable:
            break  # nothing left to cut: the runner reports what does not fit
        measure = _leaf_ids if why == "leaves" else (lambda t: t.size)
        i = max(cuttable, key=lambda i: (measure(trees[i]), trees[i].size, i))
        rung[i] += 1
        trees[i] = rungs[i][rung[i]]
    return trees
