import pytest
import torch

from nbkit.medusa.trees import build_tree, chain, get_tree, subtree

WORKED = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_worked_example_from_the_notes():
    t = build_tree(WORKED)
    assert t.tree_indices.tolist() == [0, 1, 2, 11, 12, 11, 21]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    rows = {tuple(r) for r in t.retrieve.tolist()}
    assert rows == {(0, 1, 3, 6), (0, 2, 5, -1), (0, 1, 4, -1)}


def test_attention_mask_is_ancestors_only():
    t = build_tree(WORKED)
    for a in range(t.size):
        ancestors, n = set(), a
        while n != -1:
            ancestors.add(n)
            n = t.parents[n]
        assert {b for b in range(t.size) if t.attn_mask[a, b]} == ancestors


@pytest.mark.parametrize("name,counts,leaves", [("mc_sim_7b_63", [10, 28, 23, 2], 42),
                                                ("vicuna_7b_stage2", [10, 23, 23, 7], 42)])
def test_published_trees(name, counts, leaves):
    t = get_tree(name)
    assert t.size == 64 and t.depth_counts() == counts and t.n_leaves == leaves
    # parents come before children, depths are consistent
    assert all(t.parents[n] < n and t.depths[n] == t.depths[t.parents[n]] + 1 for n in range(1, t.size))


def test_chains_and_head_limit():
    assert chain(0).size == 1 and chain(0).n_leaves == 1
    c = chain(3)
    assert c.tree_indices.tolist() == [0, 1, 11, 21] and c.depths.tolist() == [0, 1, 2, 3]
    assert get_tree("mc_sim_7b_63", n_heads=2).max_depth == 2
    with pytest.raises(ValueError, match="heads"):
        get_tree("chain-5", n_heads=4)
    with pytest.raises(ValueError, match="unknown tree"):
        get_tree("nope")


def test_bad_paths_are_errors():
    with pytest.raises(ValueError, match="no parent"):
        build_tree([[0, 1]])
    with pytest.raises(ValueError, match="outside"):
        build_tree([[10]])


def test_subtree_is_prefix_closed_and_greedy():
    full = get_tree("mc_sim_7b_63")
    scores = {p: 0.5 ** sum(p) * 0.6 ** len(p) for p in full.paths}
    for n in (1, 3, 8, 20, 63):
        s = subtree(full, scores, n)
        assert len(s.paths) == n
        assert all(p[:-1] in set(s.paths) | {()} for p in s.paths)
    assert subtree(full, scores, 1).paths == ((0,),)
    assert subtree(full, scores, 2).paths == ((0,), (0, 0))  # 0.36 beats (1,): 0.3
    assert torch.equal(subtree(full, scores, 63).attn_mask, full.attn_mask)
