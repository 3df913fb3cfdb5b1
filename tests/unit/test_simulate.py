"""Simulated greedy Medusa acceptance on known answers (nbkit.medusa.simulate)."""

import torch

from nbkit.medusa.simulate import acceptance_lengths, simulate_steps
from nbkit.medusa.trees import build_tree, get_tree


def test_perfect_candidates_accept_the_whole_depth_and_none_accept_nothing():
    tokens = torch.arange(100, 120)  # one answer of 20 tokens
    seq_end = torch.full((20,), 20)
    tree = get_tree("mc_sim_7b_63", 4)
    perfect = torch.zeros(20, 4, 10, dtype=torch.long)
    for i in range(20):
        for d in range(4):
            perfect[i, d, 0] = tokens[min(i + 1 + d, 19)]
    lengths = acceptance_lengths(perfect, tokens, seq_end, tree)
    assert lengths[:15].tolist() == [4] * 15  # near the end only the tokens that exist can match
    assert lengths[16:].tolist() == [3, 2, 1, 0]
    assert simulate_steps(lengths, seq_end) == (19, 4)  # 5 + 5 + 5 + 4 tokens after the first
    wrong = torch.full((20, 4, 10), 7)
    assert simulate_steps(acceptance_lengths(wrong, tokens, seq_end, tree), seq_end) == (19, 19)  # plain decoding


def test_only_tree_paths_count_and_answers_are_walked_separately():
    tokens = torch.tensor([1, 2, 3, 4, 5, 6])
    seq_end = torch.tensor([3, 3, 3, 6, 6, 6])  # two answers of 3 tokens
    cands = torch.full((6, 2, 10), 0)
    cands[:, 0, 1] = torch.tensor([2, 3, 0, 5, 6, 0])  # head 0's rank 1 always right
    cands[:, 1, 2] = torch.tensor([3, 0, 0, 6, 0, 0])  # head 1's rank 2 right where a token exists
    assert acceptance_lengths(cands, tokens, seq_end, build_tree([[1], [1, 2]])).tolist() == [2, 1, 0, 2, 1, 0]
    assert acceptance_lengths(cands, tokens, seq_end, build_tree([[1], [1, 1]])).tolist() == [1, 1, 0, 1, 1, 0]
    assert acceptance_lengths(cands, tokens, seq_end, build_tree([[0], [0, 2]])).tolist() == [0] * 6
    lengths = acceptance_lengths(cands, tokens, seq_end, build_tree([[1], [1, 2]]))
    assert simulate_steps(lengths, seq_end) == (4, 2)  # each answer: 2 tokens after the first in one step
