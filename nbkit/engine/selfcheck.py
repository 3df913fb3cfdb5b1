"""The start-up self-check: is decoding lossless on the device, dtype and kernels that serve?

Our promise is that greedy Medusa output equals plain greedy decoding, and a request in a batch answers
what it answers alone. The CPU tests show it on our CPU; a GPU's kernels (tiled attention, f16
accumulation, its own mask and position bugs) only show there. So at load the engine decodes two short
built-in prompts greedily: plain and alone (the reference), plain in a batch, and with the served tree
alone and in a batch, and compares each verified logits row, position by position, with the reference's.

Teacher forcing: each tree step carries the reference continuation on one root-to-leaf path (another leaf
every step) and commits that path whatever the logits say, so every verified position has a reference and
the tree's depths and branches are checked however good or random the heads are. A difference within the
noise of the dtype is float noise; an argmax it flips (the reference's top-2 margin within that noise) is a
near-tie, reported and not a failure. A difference beyond the noise is a mask, position or KV bug on this
device: the check fails, and the engine serves in a mode that passed (speculation off; one request at a
time when batching itself failed) and says so in `/info`.

A first start that serves at once (Calibrate.WHILE_SERVING) checks the references and plain batching before it
reports ready, and the tree's runs in idle time (CheckRun yields between units; warmup.py): no request uses a
tree before they pass, and plain decoding alone is the reference itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..medusa.acceptance import tree_candidates
from ..medusa.trees import TOPK, MedusaTree, chain
from .runner import Runner, TreeInput

log = logging.getLogger("nbkit.engine")

PROMPTS = ("Self-check: the quick brown fox jumps over the lazy dog, and then", "1, 2, 3, 4,")
NEW_TOKENS = 8  # per prompt: a few dozen positions in all (a tree step checks several), cheap on a CPU
# The noise allowed between two computations of one logits row, relative to the largest reference logit:
# fp32 sums in another order differ in the last bits; f16/bf16 activations carry 11/8 significant bits
# through every layer (and llama.cpp keeps its KV cache in f16 whatever the torch dtype).
RELATIVE_NOISE = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}
# On a CPU the check verifies a sub-tree of the served tree with this many speculated nodes: every depth, and
# siblings at each (what a mask or position bug breaks). The CPU kernels with the full trees at every batch
# are what the test suite checks. (In llama.cpp's exact mode the check's cost is mostly per step, not per
# node: what keeps later starts short is the cached verdict, startcache.py.)


@dataclass
class Reference:
    """Plain greedy decoding of one prompt alone: the tokens and, for each, the logits row that chose it."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


@dataclass
class RunFigures:
    """One way of decoding compared with the reference, over every position it verified."""

    positions: int = 0
    max_abs_diff: float = 0.0
    near_ties: int = 0  # argmax flipped where the reference's top-2 margin is within the noise
    disagreements: int = 0  # argmax flipped where the margin is beyond the noise
    passed: bool = True

    def compare(self, verified: torch.Tensor, plain: torch.Tensor, tolerance: float) -> None:
        verified = verified.detach().float().cpu()
        diff = float((verified - plain).abs().max())
        top2 = plain.topk(2).values
        margin = float(top2[0] - top2[1])
        self.positions += 1
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if int(verified.argmax()) != int(plain.argmax()):
            if margin <= tolerance:
                self.near_ties += 1
            else:
                self.disagreements += 1
        self.passed = self.max_abs_diff <= tolerance and self.disagreements == 0


@dataclass
class SelfCheck:
    """What `/info` reports as `self_check`."""

    passed: bool
    tolerance: float
    runs: dict[str, RunFigures]
    device: str
    dtype: str
    seconds: float
    served: str = ""  # the speculation mode served after the check
    tree: str = "none"  # the tree verified (check_tree: the served one, or its sub-tree on a CPU)
    fallback: str | None = None  # what the engine gave up because of a failure, in words
    cached: bool = False  # the verdict of an earlier identical check (startcache.py), not checked again now
    pending: bool = False  # the tree's runs are still to come (a first start checks them in idle time)

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.runs.values()), default=0.0)

    @property
    def near_ties(self) -> int:
        return sum(r.near_ties for r in self.runs.values())

    def to_dict(self) -> dict:
        runs = {name: asdict(r) for name, r in self.runs.items()}
        return {"passed": self.passed, "served": self.served, "fallback": self.fallback,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "argmax_agrees": all(r.disagreements == 0 for r in self.runs.values()),
                "tokens_equal": all(r.disagreements == 0 and r.near_ties == 0 for r in self.runs.values()),
                "near_ties": self.near_ties, "positions": sum(r.positions for r in self.runs.values()),
                "device": self.device, "dtype": self.dtype, "seconds": round(self.seconds, 3), "runs": runs,
                "tree": self.tree, "cached": self.cached, "pending": self.pending}

    def describe(self) -> str:
        """One line for the notebook."""
        verdict = ("passed" if self.passed else "FAILED") + (" (cached verdict)" if self.cached else "")
        line = (f"self-check {verdict} on {self.device} ({self.dtype}): {sum(r.positions for r in self.runs.values())}"
                f" positions, max |logit diff| {self.max_abs_diff:.2g} (noise allowed {self.tolerance:.2g}), "
                f"{self.near_ties} near-tie(s); serving with speculation {self.served}")
        line += " (the tree is checked in idle time, before any request uses it)" if self.pending else ""
        return line + (f" ({self.fallback})" if self.fallback else "")


class CheckRun:
    """One self-check, in units: the references, then each group of each way of decoding (plain batched
    first, then the tree alone and batched). `advance()` runs units until done or `should_yield()` (checked
    between units), so a first start can check plain decoding before it serves and the tree in idle time."""

    def __init__(self, runner: Runner, heads, tree: MedusaTree | None, prompts: list[list[int]],
                 new_tokens: int = NEW_TOKENS, batch: bool = True):
        self.runner, self.heads, self.prompts, self.new_tokens = runner, heads, prompts, new_tokens
        ways = {"plain_batched": (chain(0), True)} if batch else {}
        if tree is not None and tree.size > 1:
            ways["tree_alone"] = (tree, False)
            if batch:
                ways["tree_batched"] = (tree, True)
        self.ways = ways
        every = list(range(len(prompts)))
        self.units = [(name, every if batched else [i]) for name, (_, batched) in ways.items()
                      for i in (every[:1] if batched else every)]
        self.runs = {name: RunFigures() for name in ways}
        self.refs: list[Reference] | None = None
        self.tolerance = 0.0
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.refs is not None and not self.units

    def slots_needed(self) -> int:
        return len(self.prompts) if "plain_batched" in self.ways or "tree_batched" in self.ways else 1

    def cells_needed(self) -> int:
        """KV cells its slots hold at most: each prompt, its tokens and the largest tree verified on top."""
        largest = max(tree.size for tree, _ in self.ways.values()) if self.ways else 1
        return sum(len(p) + self.new_tokens + largest for p in self.prompts)

    @property
    def plain_done(self) -> bool:
        """The references and plain batched decoding are checked (what remains verifies trees)."""
        return self.refs is not None and all(name != "plain_batched" for name, _ in self.units)

    def advance(self, should_yield: Callable[[], bool] = lambda: False) -> bool:
        start = time.perf_counter()
        try:
            if self.refs is None:
                if should_yield():
                    return False
                self.refs = [_reference(self.runner, p, self.new_tokens) for p in self.prompts]
                scale = max(float(row.abs().max()) for ref in self.refs for row in ref.logits)
                noise = RELATIVE_NOISE.get(noise_dtype(self.runner), RELATIVE_NOISE[torch.float16])
                self.tolerance = noise * max(1.0, scale)
            while self.units:
                if should_yield():
                    return False
                name, group = self.units[0]
                _forced(self.runner, self.heads, self.ways[name][0], [self.refs[i] for i in group], self.runs[name],
                        self.tolerance)
                self.units.pop(0)
            return True
        finally:
            self.seconds += time.perf_counter() - start

    def result(self) -> SelfCheck:
        """The verdict over the ways checked so far (`pending`: the tree's are still to come)."""
        runs = {name: r for name, r in self.runs.items() if all(name != n for n, _ in self.units)}
        return SelfCheck(all(r.passed for r in runs.values()), self.tolerance, runs, str(self.runner.device),
                         str(self.runner.dtype).replace("torch.", ""), self.seconds, pending=not self.done)


def check_runner(runner: Runner, heads, tree: MedusaTree | None, prompts: list[list[int]],
                 new_tokens: int = NEW_TOKENS, batch: bool = True) -> SelfCheck:
    """Compare plain batched, tree alone and tree batched decoding (tree None: plain batched only; batch
    False: alone only) with plain decoding alone, all now."""
    run = CheckRun(runner, heads, tree, prompts, new_tokens, batch)
    run.advance()
    return run.result()


def noise_dtype(runner: Runner) -> torch.dtype:
    """The precision a runner's logits carry: llama.cpp keeps K and V in f16 or q8_0 (its flash attention reads
    them as f16 even from an f32 cache), whatever dtype it hands the hidden states back in."""
    return torch.float16 if getattr(runner, "k_type", None) is not None else runner.dtype


def _reference(runner: Runner, prompt: list[int], n: int) -> Reference:
    ref = Reference(list(prompt))
    slot = runner.alloc()
    try:
        logits, _ = runner.prefill({slot: ref.prompt})[slot]
        while True:
            row = logits.detach().float().cpu()
            ref.logits.append(row)
            ref.tokens.append(int(row.argmax()))
            if len(ref.tokens) == n:
                return ref
            out = runner.verify([TreeInput(slot, chain(0), [ref.tokens[-1]])])
            runner.commit({slot: [0]})
            logits = out[slot][0][0]
    finally:
        runner.free(slot)


def _forced(runner: Runner, heads, tree: MedusaTree, refs: list[Reference], figures: RunFigures,
            tolerance: float) -> None:
    """Decode `refs` together with `tree`, each step forcing the reference continuation on one of its paths."""
    slots: dict[int, Reference] = {}
    try:
        for ref in refs:
            slots[runner.alloc()] = ref
        out = runner.prefill({s: ref.prompt for s, ref in slots.items()})
        done = {s: 0 for s in slots}  # index of each slot's root token in its reference
        hidden = {s: out[s][1] for s in slots}
        step = 0
        while slots:
            batch, paths = [], {}
            for i, (s, ref) in enumerate(slots.items()):
                paths[s] = _path(tree, step + 3 * i)[: len(ref.tokens) - 1 - done[s]]
                topk = _proposals(runner, heads, tree, hidden[s], len(ref.logits[0]))
                _force(topk, tree, paths[s], ref.tokens[done[s] + 1:])
                batch.append(TreeInput(s, tree, tree_candidates(tree, ref.tokens[done[s]], topk)))
            results = runner.verify(batch)
            for s, ref in slots.items():
                logits, states = results[s]
                for depth, node in enumerate(paths[s]):
                    figures.compare(logits[node], ref.logits[done[s] + depth + 1], tolerance)
                hidden[s] = states[paths[s][-1]]
                done[s] += len(paths[s])
            runner.commit(paths)
            for s in [s for s, ref in slots.items() if done[s] >= len(ref.tokens) - 1]:
                del slots[s]
                runner.free(s)
            step += 1
    finally:
        for s in slots:
            runner.free(s)


def _path(tree: MedusaTree, i: int) -> list[int]:
    """Nodes root..leaf of the tree's i-th leaf (modulo the leaves), so steps visit different branches."""
    row = tree.retrieve[(5 * i) % tree.n_leaves]
    return [int(n) for n in row if n >= 0]


def _proposals(runner: Runner, heads, tree: MedusaTree, hidden: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """[depth, TOPK] candidates for the tree's other branches: the heads' own where a hidden state is known
    (their kernels run on the device too), else fixed filler ids."""
    if tree.size == 1:
        return None
    depth = tree.max_depth
    if heads is not None and hidden.numel():
        with torch.inference_mode():
            lm_head = runner.lm_head if heads.shared_lm_head else None  # own-lm_head heads never read it
            top = heads.topk(hidden[None], lm_head, TOPK)[0].cpu()
        return top[:depth].clone()
    return (torch.arange(depth * TOPK).reshape(depth, TOPK) * 7 + 3) % vocab


def _force(topk: torch.Tensor | None, tree: MedusaTree, path: list[int], continuation: list[int]) -> None:
    """Put the reference continuation at the ranks of `path`'s nodes (node d carries continuation[d - 1])."""
    if topk is None or len(path) < 2:
        return
    ranks = tree.paths[path[-1] - 1]
    for d in range(1, len(path)):
        topk[d - 1, ranks[d - 1]] = continuation[d - 1]


def run_self_check(engine, while_serving: bool = False) -> SelfCheck:
    """Check the engine's runner with the tree it serves, and fall back to a mode that passed. while_serving:
    plain decoding now, the tree's runs later in idle time (`finish_self_check`; no request uses a tree before)."""
    spec = engine.speculation
    speculating = engine.heads is not None and spec.mode != "off"
    tree = (spec.fixed or engine.base_tree) if speculating else None  # the tree that serves, on every device
    cache = engine.startup_cache  # the verdict of an identical check on this machine, if one was made
    check = cache.self_check() if cache is not None else None
    if check is None:
        run = CheckRun(engine.runner, engine.heads, tree, [engine.encode(p) for p in PROMPTS],
                       batch=engine.max_batch > 1)
        run.advance((lambda: run.plain_done) if while_serving else (lambda: False))
        check = run.result()
        if run.done and cache is not None:
            cache.save_self_check(check)
        if not run.done:
            engine.pending_check = run
            spec.trees_checked = False
    check = _apply(engine, check, tree)
    if spec.mode == "off":  # plain decoding failed in a batch: no tree will serve, none to check
        engine.pending_check, spec.trees_checked = None, True
    return check


def finish_self_check(engine, should_yield: Callable[[], bool]) -> bool:
    """Go on with a check left for idle time until done (True: its verdict applied) or `should_yield()`."""
    run = engine.pending_check
    if not run.advance(should_yield):
        return False
    engine.pending_check = None
    engine.speculation.trees_checked = True
    check = run.result()
    if engine.startup_cache is not None:
        engine.startup_cache.save_self_check(check)
    engine.self_check = _apply(engine, check, engine.speculation.fixed or engine.base_tree)
    return True


def _apply(engine, check: SelfCheck, tree: MedusaTree | None) -> SelfCheck:
    """Serve in a mode that passed: one request at a time if batching failed, no trees if a tree run failed."""
    spec = engine.speculation
    speculating = tree is not None
    runs = check.runs
    if not check.passed:
        failed = [name for name, r in runs.items() if not r.passed]
        if "plain_batched" in failed:
            engine.max_batch = 1
            check.fallback = "one request at a time"
        if speculating and (not runs.get("tree_alone", RunFigures()).passed or "plain_batched" in failed or
                            not runs.get("tree_batched", runs.get("tree_alone", RunFigures())).passed):
            spec.turn_off()
            engine.trees_refused = f"the self-check failed on this device ({', '.join(failed)})"
            check.fallback = ", ".join(filter(None, [check.fallback, "speculation off"]))
        check.fallback = f"{check.fallback}: {', '.join(failed)} failed"
    check.served, check.tree = spec.mode, tree.name if tree is not None else "none"
    if check.passed:
        log.info("%s", check.describe())
    else:
        log.error("%s: %s", check.describe(), check.to_dict())
    return check
