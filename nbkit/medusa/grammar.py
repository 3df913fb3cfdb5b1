"""A grammar over a Medusa tree: the token mask at every node, proposals the grammar forbids pruned.

A grammar matcher (xgrammar's GrammarMatcher: accept_token, rollback, fill_next_token_bitmask) holds the state
after the tokens emitted so far, the tree's root included. The mask at node n is the matcher's after the path
root..n; a depth-first walk feeds each child's token and rolls it back, so one matcher serves the whole tree.
A child whose token its parent's mask forbids can never be accepted (acceptance walks the masked distribution):
it is pruned with its subtree before verification, so the runner verifies only what may be accepted.

Masks are packed bitmasks (int32 words, token t is bit t % 32 of word t // 32), as every grammar engine writes
them; `mask_logits` unpacks them where the logits are.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .trees import MedusaTree, build_tree

# bit j of byte b, for every byte: unpacks a bitmask's bytes with one gather instead of 32 shifts per word
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def bitmask_width(vocab_size: int) -> int:
    """int32 words per packed mask."""
    return (vocab_size + 31) // 32


def allows(bitmask_row: torch.Tensor, token: int) -> bool:
    """Whether a packed mask row allows `token`."""
    return bool((int(bitmask_row[token >> 5]) >> (token & 31)) & 1)


def tree_masks(matcher, tree: MedusaTree, tokens: list[int], vocab_size: int,
               stop_ids: frozenset[int]) -> tuple[list[int], torch.Tensor]:
    """(nodes the grammar allows, root first in node order; their packed masks [len(kept), W]).

    A node is kept when its parent is and its parent's mask allows its token. A child carrying a stop token is
    pruned too: the request ends at that token, so verifying past it buys nothing, and its parent's mask
    already lets the walk emit it as the bonus token."""
    bitmask = torch.zeros(tree.size, bitmask_width(vocab_size), dtype=torch.int32)
    kept: list[int] = []

    def visit(node: int) -> None:
        kept.append(node)
        matcher.fill_next_token_bitmask(bitmask, node)
        for child in tree.children[node].values():
            token = tokens[child]
            if token in stop_ids or not allows(bitmask[node], token):
                continue
            if not matcher.accept_token(token):
                raise RuntimeError(f"the grammar matcher refused token {token} that its mask allowed")
            visit(child)
            matcher.rollback(1)

    visit(0)
    kept.sort()
    return kept, bitmask[kept]


def pruned_tree(tree: MedusaTree, kept: list[int]) -> MedusaTree:
    """The sub-tree of `kept` nodes (prefix-closed, root included): build_tree's order keeps them in order, so
    node i of the result is kept[i]."""
    if len(kept) == tree.size:
        return tree
    return _pruned(tree.name, tree.paths, tuple(kept))


@lru_cache(maxsize=4096)
def _pruned(name: str, paths: tuple[tuple[int, ...], ...], kept: tuple[int, ...]) -> MedusaTree:
    return build_tree([paths[n - 1] for n in kept[1:]], name=f"{name}|grammar")


def unpack(bitmask: torch.Tensor, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed masks [N, W] -> bool [N, vocab_size] on `device` (tokens past the grammar's vocabulary: False)."""
    n, width = bitmask.shape
    as_bytes = bitmask.contiguous().view(torch.uint8).to(device)  # little-endian: byte k of word w = tokens 32w+8k..
    bits = _BYTE_BITS.to(device)[as_bytes.long()].reshape(n, width * 32)
    if vocab_size <= width * 32:
        return bits[:, :vocab_size]
    return torch.cat([bits, bits.new_zeros(n, vocab_size - width * 32)], dim=1)


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V] with every token the packed masks forbid at -inf (a copy)."""
    allowed = unpack(bitmask, logits.shape[-1], logits.device)
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("the grammar allows no token of this model's vocabulary here")
    return logits.masked_fill(~allowed, float("-inf"))
