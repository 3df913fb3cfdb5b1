"""Structured output as a step stage: grammars compiled off the engine loop, a matcher per request, every tree
node masked, forbidden proposals pruned, forced text drafted (jump-forward).

The grammar engine is xgrammar (docs/measurements.md, "Grammar engines": ~9 µs per mask on a 49k vocabulary,
~5x less than llguidance, which matters as every tree node is masked; it rolls back and finds forced tokens).
Its tokenizer information comes from the served tokenizer: the HF tokenizer the torch engine loads, or the one
the llama.cpp engine reads from its GGUF (gguf/files.py), so masks index the vocabulary the logits use.

Per step, for a request with a grammar (its `GrammarState` on `Request.grammar`):
  jump_forward  where the grammar forces a continuation (`{"city": "` after `{`), the step's tree is that
                chain of tokens instead of the heads' guesses: one pass verifies all of them.
  inputs        each node's mask is the grammar's state after the path to it (tree_masks); nodes the grammar
                forbids are pruned, so the runner verifies a smaller tree.
  accept        acceptance walks the masked logits (greedy, lossless sampling or typical, unchanged), so greedy
                output equals constrained greedy decoding without speculation and sampled output has exactly
                the constrained distribution; forced tokens are accepted where the model's masked choice agrees
                (always, where the grammar allows no other token). The emitted tokens advance the matcher.
The first token after prefill is masked the same way (a root-only tree). Stop tokens are allowed only where
the grammar accepts (xgrammar's matcher, with the engine's end-of-sequence ids as its stop tokens).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..medusa.acceptance import accept, tree_candidates
from ..medusa.grammar import bitmask_width, mask_logits, pruned_tree, tree_masks
from ..medusa.trees import MedusaTree, chain
from .request import GrammarKind, GrammarSpec, Request
from .runner import TreeInput
from .schema_check import check_schema

JUMP_FORWARD_MAX = 16  # forced tokens drafted in one step (a long constant key: the rest come next step)
CACHED_GRAMMARS = 256  # compiled grammars kept (least recently used dropped): clients choose the schemas


@dataclass
class GrammarState:
    """One request's grammar: its matcher (after every emitted token) and this step's node masks."""

    matcher: object  # xgrammar.GrammarMatcher
    masks: torch.Tensor | None = None  # packed masks of this step's (pruned) tree nodes; None: none computed
    forced: list[int] = field(default_factory=list)  # this step's jump-forward draft ([]: the heads' tree)


class GrammarStage:
    """Compiles and caches grammars (any thread but the engine's), and constrains each step (the engine's)."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.jump_forward = True  # draft forced text (bench/structured.py compares with and without)
        self._compiled: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._compiler = None
        self._lock = threading.Lock()  # compiles come from the server's worker threads

    # ---- compiling (never in the engine loop) ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        tok = self.tokenizer
        return max(len(tok), tok.vocab_size) if hasattr(tok, "__len__") else tok.vocab_size

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of `spec` (cached); ValueError naming the problem for a bad schema or regex."""
        with self._lock:
            if (found := self._compiled.get(spec)) is not None:
                self._compiled.move_to_end(spec)
                return found
        compiled = self._compile(spec)  # outside the lock: one slow schema does not hold up the others
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        with self._lock:
            compiler = self._compiler or self._new_compiler()
        try:
            if spec.kind is GrammarKind.REGEX:
                return compiler.compile_regex(spec.value)
            schema = '{"type": "object"}' if spec.kind is GrammarKind.JSON_OBJECT else spec.value
            check_schema(json.loads(schema))
            return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=False)
        except json.JSONDecodeError as err:
            raise ValueError(f"the JSON schema is not valid JSON: {err}") from None
        except RuntimeError as err:  # xgrammar's parse errors: "<time> <file>:<line>: <message>"
            what = "regex" if spec.kind is GrammarKind.REGEX else "JSON schema"
            raise ValueError(f"invalid {what}: {str(err).split(': ', 1)[-1].strip()}") from None

    def _new_compiler(self):
        import xgrammar

        stop = sorted(self.eos_ids)
        if hasattr(self.tokenizer, "backend_tokenizer"):  # an HF (fast) tokenizer: the served one, as it is
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=stop)
        else:  # any other tokenizer: each token's text, as the engine's detokenizer shows it
            vocab = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]
            info = xgrammar.TokenizerInfo(vocab, vocab_size=self.vocab_size, stop_token_ids=stop)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def start(self, spec: GrammarSpec | None) -> GrammarState | None:
        """A request's grammar state (compiling here, in the caller's thread, if not done before)."""
        if spec is None:
            return None
        import xgrammar

        return GrammarState(xgrammar.GrammarMatcher(self.compile(spec), override_stop_tokens=sorted(self.eos_ids)))

    # ---- the step (engine thread) --------------------------------------------------------------
    def draft(self, running: list[Request], trees: dict[int, MedusaTree]) -> dict[int, MedusaTree]:
        """Trees with jump-forward chains where a request's grammar forces tokens (before the budgets cut)."""
        for r in running:
            st = r.grammar
            if st is None:
                continue
            room = r.params.max_tokens - len(r.output_ids) - 1  # the bonus token comes on top
            st.forced = st.matcher.find_jump_forward_tokens()[:min(JUMP_FORWARD_MAX, room)] \
                if self.jump_forward and room > 0 else []
            if st.forced:
                trees[r.id] = chain(len(st.forced))
        return trees

    def inputs(self, running: list[Request], trees: dict[int, MedusaTree],
               topk: dict[int, torch.Tensor]) -> list[TreeInput]:
        """The verification inputs: each tree's tokens, a grammar's forbidden nodes pruned (`trees` updated)."""
        inputs = []
        for r in running:
            tree, st = trees[r.id], r.grammar
            if st is not None and st.forced:
                tokens = [r.pending] + st.forced[:tree.size - 1]  # the budgets may have cut the chain
            else:
                tokens = tree_candidates(tree, r.pending, topk.get(r.id))
            if st is not None:
                kept, st.masks = tree_masks(st.matcher, tree, tokens, self.vocab_size, frozenset(self.eos_ids))
                tree = trees[r.id] = pruned_tree(tree, kept)
                tokens = [tokens[n] for n in kept]
            inputs.append(TreeInput(r.slot, tree, tokens))
        return inputs

    def accept(self, r: Request, tree: MedusaTree, tokens: list[int], logits: torch.Tensor,
               generator: torch.Generator | None) -> tuple[list[int], list[int]]:
        """(emitted, accepted nodes) of the walk over the masked logits; the grammar advances by the tokens."""
        st = r.grammar
        if st is None:
            return accept(tree, tokens, logits, r.params, generator)
        masks = st.masks
        st.masks = None
        if masks is None:  # the first token after prefill: the root's mask, computed now
            masks = torch.zeros(1, bitmask_width(self.vocab_size), dtype=torch.int32)
            st.matcher.fill_next_token_bitmask(masks, 0)
        emitted, nodes = accept(tree, tokens, mask_logits(logits, masks), r.params, generator)
        for t in emitted:
            if t in self.eos_ids:
                break  # the request ends here
            if not st.matcher.accept_token(t):
                raise RuntimeError(f"the grammar refused token {t} that its mask allowed")
        return emitted, nodes
