"""The engine: decides, every step, which requests run and how much each speculates.

Iteration-level ("continuous") batching: new requests join at the next step, their prompts are
prefilled in chunks under a per-step token budget, finished or cancelled requests leave at once.
Each step verifies every running request's Medusa tree in ONE forward pass of the runner, accepts
per request (greedy, lossless sampling or typical), commits the accepted paths, and streams the
tokens out. The runner does the tensor work (runner.py is the contract); this module never touches a
KV cache. Speculation (speculation/) picks each step's trees: the engine talks to it through one object.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque

import torch

from ..medusa.heads import MedusaHeads
from ..medusa.trees import TOPK, MedusaTree, chain
from .admission import Admission, ContinuousAdmission, check_fits
from .budget import fit_trees
from .emit import emit_tokens
from .grammar import GrammarStage
from .introspect import EngineLimits, limits, new_counters, report_step, snapshot
from .logprobs import token_logprobs
from .prefix import PrefixCache
from .request import (
    EngineStopped,
    Finished,
    FinishReason,
    GrammarSpec,
    Overloaded,
    Request,
    RequestHandle,
    RequestState,
    SamplingParams,
    TextStream,
)
from .runner import Runner, SlotOutput, TreeInput, runner_member
from .selfcheck import CheckRun, SelfCheck, run_self_check
from .speculation import Calibrate, CostModel, Probe, Speculation, StepPlan, StepResult
from .threads import EngineLoop

log = logging.getLogger("nbkit.engine")


class Engine:
    """Continuous-batching Medusa engine over a runner (torch or llama.cpp); start() gives it its own thread."""

    def __init__(
        self, runner: Runner, tokenizer, heads: MedusaHeads | None = None, *, base_tree: str = "mc_sim_7b_63",
        speculation: str = "adaptive", max_batch: int | None = None, max_queue: int = 64,
        prefill_budget: int = 256, cost_model: CostModel | None = None,
        model_name: str = "model", max_restarts: int | None = None, self_check: bool = False,
        admission: Admission | None = None, prefix_cache: bool = True,
        calibrate: Calibrate | str = Calibrate.AT_START,
    ):
        self.runner, self.tokenizer, self.heads = runner, tokenizer, heads
        self.model_name = model_name
        self.max_batch = min(max_batch or runner.max_slots, runner.max_slots)
        self.max_queue, self.prefill_budget = max_queue, prefill_budget
        self.eos_ids = set(runner.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.grammar = GrammarStage(tokenizer, self.eos_ids)  # structured output (grammar.py)
        self.speculation = Speculation(heads, base_tree, speculation, cost_model, runner.max_leaves,
                                       runner.recomputes_accepted)
        self.base_tree = self.speculation.base_tree
        # Every slot keeps room in its context for the largest tree it may verify (+1: the root's next token).
        self.tree_reserve = self.speculation.largest_tree() + 1
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.cond = threading.Condition()  # guards waiting and active (submit() runs in the callers' threads)
        self.admission = admission or ContinuousAdmission()
        self.prefix = PrefixCache(prefix_cache)  # finished requests' KV, reused by prompts that start with it
        self._ids = itertools.count(1)
        self.loop = EngineLoop(self, max_restarts)
        self.counters = new_counters()
        self.on_step = None  # metrics hook (introspect.report_step), called from the engine thread
        # The start-up self-check (selfcheck.py): prepare() runs it when asked (load_engine asks by default,
        # so every served model is checked on its device); its result goes to /info.
        self.run_self_check = self_check
        self.self_check: SelfCheck | None = None
        self.trees_refused: str | None = None  # why requests may not ask for a tree (a failed self-check)
        self.pending_check: CheckRun | None = None  # the self-check's tree runs, left for idle time (warmup.py)
        self.startup_cache = None  # startcache.StartupCache: an earlier start's verdict and prices (load_engine)
        # When the engine thread measures forward costs that no earlier start cached: before it reports ready,
        # or while serving (ready at once, plain decoding until its idle time measured them: calibration.py).
        self.calibrate = Calibrate(calibrate)

    # ---- life cycle (the thread: threads.EngineLoop) ------------------------------------------
    def start(self, timeout: float = 600.0) -> Engine:
        """Serve from the engine's own thread (it prepares first); see threads.py for why one thread."""
        self.loop.start(timeout)
        return self

    def stop(self, timeout: float = 10.0, drain: bool = False) -> None:
        """Stop the thread (drain=True: running requests finish first, up to `timeout`)."""
        self.loop.stop(timeout, drain)

    @property
    def alive(self) -> bool:
        return self.loop.alive

    @property
    def dead(self) -> str | None:
        """Why the engine thread died (None: it did not)."""
        return self.loop.dead

    def limits(self) -> EngineLimits:
        return limits(self)

    def snapshot(self) -> dict:
        return snapshot(self)

    def prepare(self, while_serving: bool = False) -> Engine:
        """Check once that decoding is lossless on this device (falling back to a mode that is), then
        measure the forward cost once (adaptive speculation needs it): now, or (while_serving, the engine
        thread with Calibrate.WHILE_SERVING) in idle time (warmup.py), the self-check's tree runs too."""
        if self.run_self_check and self.self_check is None:
            self.self_check = run_self_check(self, while_serving)
        self.speculation.prepare(self.runner, self.heads, self.max_batch, self.startup_cache, while_serving)
        return self

    # ---- requests -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; raises ValueError (bad input), Overloaded (queue full), EngineStopped."""
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.tree not in (None, "none") and self.heads is None:
            raise ValueError("this engine has no Medusa heads: tree must be 'none'")
        if params.tree not in (None, "none") and self.trees_refused:
            raise ValueError(f"speculation is off: {self.trees_refused}; tree must be 'none'")
        check_fits(len(prompt_ids), params, self._tree_reserve(params), self.runner)
        if (why := self.loop.refusal()) is not None:
            raise EngineStopped(why)
        grammar = self.grammar.start(params.grammar)  # compiled already if the caller used compile_grammar
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.cond:
            # max_queue counts requests waiting beyond the free slots: a burst that arrives within one
            # step while slots are free joins at the next step instead of being refused.
            if len(self.waiting) >= self.max_queue + max(0, self.max_batch - len(self.active)):
                self.counters["rejected"] += 1
                raise Overloaded(f"the queue is full ({self.max_queue} waiting)")
            handle = RequestHandle(next(self._ids), loop)
            gen = None
            if not params.greedy:  # on the runner's device: a CUDA multinomial refuses a CPU generator
                gen = torch.Generator(device=self.runner.device).manual_seed(
                    params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
            req = Request(handle.id, list(prompt_ids), params, handle, TextStream(self.tokenizer, params.stop),
                          generator=gen, grammar=grammar)
            self.waiting.append(req)
            self.cond.notify_all()
        return handle

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile and cache a grammar (seconds for a large schema: call it off the event loop and the engine
        thread); ValueError naming the problem for a bad or unsupported schema or regex."""
        self.grammar.compile(spec)

    def _tree_reserve(self, params: SamplingParams) -> int:
        """Context a request keeps free for the largest tree it may verify (+1: the root's next token)."""
        if params.tree is None:
            return self.tree_reserve
        return max(self.tree_reserve, self.speculation.tree(params.tree).size + 1)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = False) -> Finished:
        """Run one request to the end. Without a started thread the caller's thread drives the steps."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else prompt
        if not self.loop.started:
            self.prepare()
        handle = self.submit(ids, params)
        if not self.loop.started:
            while handle.finished is None:
                self.step()
        return handle.result()

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """A raw prompt as `tokenizer(prompt)` (BOS when the tokenizer adds one), or a one-turn chat (the chat
        template, or vicuna's conversation without one). The caller wrote it: special tokens are real."""
        from ..chat_format import prompt_ids, user_prompt_ids

        if chat:
            return user_prompt_ids(self.tokenizer, prompt)
        return prompt_ids(self.tokenizer, prompt)

    def step(self) -> None:
        """One iteration: admit waiting requests into free slots and drop cancelled ones; then ONE verification
        pass over the decoding requests (schedule -> run -> postprocess, in _decode); then ONE pass of prompt
        chunks for the prefilling ones. Decode comes first: new prompts never delay running requests' tokens,
        and a request whose prefill ends this step decodes from the next."""
        self._admit()
        self._drop_cancelled()
        running = [r for r in self.active if r.state is RequestState.DECODING]
        if running:
            self._decode(running)
        self._prefill()
        self.admission.end_step(self.active, self.runner)

    def _admit(self) -> None:
        with self.cond:
            for req in [r for r in self.waiting if r.handle.cancelled]:  # a client that left frees its queue place now
                self.waiting.remove(req)
                self._finish(req, FinishReason.CANCELLED)
            if not self.admission.admits(self.active):
                return
            while self.waiting and len(self.active) < self.max_batch:
                if self.waiting[0].handle.cancelled:
                    self._finish(self.waiting.popleft(), FinishReason.CANCELLED)
                    continue
                if not self.prefix.fits(self, self.waiting[0]):
                    break  # FIFO: it waits for the cells of requests that finish
                req = self.waiting.popleft()
                req.slot = self.prefix.place(self, req)  # with the longest prefix of its prompt already in KV
                req.state, req.admitted_at = RequestState.PREFILLING, time.monotonic()
                req.acceptance = self.speculation.new_request()
                self.active.append(req)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.active if r.handle.cancelled]:
            self._finish(req, FinishReason.CANCELLED)

    def _decode(self, running: list[Request]) -> None:
        """schedule (speculation's plan, the heads) -> run (verify) -> postprocess (accept, commit, emit)."""
        # The clock is read with the device idle (a GPU returns from a call once its work is queued): without
        # it a step is charged the prefill queued before it, and not its own commit.
        self.runner.synchronize()
        start = time.perf_counter()
        try:  # everything shared by the batch: a failure fails the batch's requests, not the engine
            plan, inputs = self._schedule(running)
            carried = sum(r.carried for r in running) if self.runner.recomputes_accepted else 0
            self.runner.synchronize()
            t0 = time.perf_counter()
            results = self.runner.verify(inputs + self.admission.padding())
        except Exception as err:  # a failed forward pass fails the requests in it, not the engine
            log.exception("verification failed")
            for r in running:
                self._finish(r, FinishReason.ERROR, f"generation failed: {err}")
            return
        commits, emitted, (proposed, accepted) = self._accept_all(running, plan.trees, inputs, results)
        try:
            self.runner.commit(self.admission.pad_commits(commits, self.runner,
                                                          self.runner.max_context - self.tree_reserve))
        except Exception as err:  # the KV rows of this batch are in an unknown state: end its requests
            log.exception("commit failed")
            for r in running:
                self._finish(r, FinishReason.ERROR, f"generation failed: {type(err).__name__}: {err}")
            return
        self.runner.synchronize()
        seconds, tokens = time.perf_counter() - t0, sum(map(len, emitted.values()))
        self.speculation.record(StepResult(
            len(results), max(t.size for t in plan.trees.values()), seconds, time.perf_counter() - start, tokens,
            plan.probe, carried, proposed, accepted))
        self.counters["steps"] += 1
        self.counters["step_seconds"] += seconds
        for r in running:
            if r.id in emitted:
                self._emit_safely(r, emitted[r.id])
        report_step(self.on_step, len(running), plan.chosen, seconds, tokens)

    def _schedule(self, running: list[Request]) -> tuple[StepPlan, list[TreeInput]]:
        """Speculation's plan cut to the runner's budgets, and the verification inputs (head top-k included)."""
        plan = self.speculation.plan(running, len(self.active))
        plan.trees = self._fit(self.grammar.draft(running, plan.trees), running)
        topk = self._head_topk(plan.heads_rows(running))
        return plan, self.grammar.inputs(running, plan.trees, topk)  # tree tokens; a grammar's nodes pruned

    def _fit(self, trees: dict[int, MedusaTree], running: list[Request]) -> dict[int, MedusaTree]:
        """Each request's tree cut to the runner's sequence-id and batch-token budgets (budget.py)."""
        carried = [r.carried if self.runner.recomputes_accepted else 0 for r in running]
        fitted = fit_trees([trees[r.id] for r in running], carried, runner_member(self.runner, "n_batch"),
                           self.runner.max_leaves)
        return {r.id: t for r, t in zip(running, fitted)}

    def _accept_all(self, running: list[Request], trees: dict[int, MedusaTree], inputs: list[TreeInput],
                    results: dict[int, SlotOutput]) -> tuple[dict[int, list[int]], dict[int, list[int]], tuple]:
        """Each request's accepted path (commits, by slot), emitted tokens (by request) and the tree tokens
        (proposed, accepted); a request whose acceptance fails is finished with an error and left out."""
        commits, emitted, proposed, accepted = {}, {}, 0, 0
        for r, item in zip(running, inputs):
            tree = trees[r.id]
            try:
                logits, hidden = results[r.slot]
                emitted[r.id], nodes = self.grammar.accept(r, tree, item.tokens, logits, r.generator_on(logits.device))
                r.logprobs += token_logprobs(logits, nodes, emitted[r.id], r.params)
            except Exception as err:
                self._finish(r, FinishReason.ERROR, f"generation failed: {type(err).__name__}: {err}")
                continue
            commits[r.slot] = nodes
            r.set_hidden(hidden[nodes[-1]])
            r.carried = len(nodes) - 1
            r.steps += 1
            r.accepted_tokens += len(emitted[r.id])
            if tree.size > 1:
                r.spec_steps += 1
                proposed, accepted = proposed + tree.size - 1, accepted + len(nodes) - 1
                self.counters["spec_steps"] += 1
                self.counters["spec_tokens"] += len(emitted[r.id])
        return commits, emitted, (proposed, accepted)

    def _emit_safely(self, r: Request, tokens: list[int]) -> None:
        try:
            self._emit(r, tokens)
        except Exception as err:  # detokenizing or streaming one request's tokens fails that request only
            log.exception("emitting tokens failed")
            self._finish(r, FinishReason.ERROR, f"generation failed: {type(err).__name__}: {err}")

    def _head_topk(self, requests: list[Request]) -> dict[int, torch.Tensor]:
        if not requests or self.heads is None:
            return {}
        hidden = torch.stack([r.hidden for r in requests])
        # Heads with their own lm_head never touch the runner's (llama.cpp would dequantize a dense copy).
        lm_head = self.runner.lm_head if self.heads.shared_lm_head else None
        top = self.heads.topk(hidden, lm_head, TOPK).cpu()  # [N, heads, k]
        for r, t in zip(requests, top):
            r.probes.append(Probe(len(r.output_ids), t))
        return {r.id: t for r, t in zip(requests, top)}

    def _prefill(self) -> None:
        """Prompt chunks of the waiting-to-run requests, FIFO, under the per-step token budget: one pass."""
        budget, chunks, owners = self.prefill_budget, {}, []
        for r in self.prefix.prefilling(self):  # requests sharing a prompt wait for one to prefill it
            if budget <= 0:
                break
            chunk = r.prompt_ids[r.n_prefilled : r.n_prefilled + budget]
            chunks[r.slot] = chunk
            owners.append(r)
            budget -= len(chunk)
        if not chunks:
            return
        try:
            results = self.runner.prefill(chunks)
        except Exception as err:
            log.exception("prefill failed")
            for r in owners:
                self._finish(r, FinishReason.ERROR, f"prefill failed: {err}")
            return
        for r in owners:
            r.n_prefilled += len(chunks[r.slot])
            self.counters["prefill_tokens"] += len(chunks[r.slot])
            if r.n_prefilled < len(r.prompt_ids):
                continue
            logits, hidden = results[r.slot]
            try:
                first, _ = self.grammar.accept(r, chain(0), [0], logits[None], r.generator_on(logits.device))
                r.logprobs += token_logprobs(logits[None], [0], first, r.params)
            except Exception as err:
                self._finish(r, FinishReason.ERROR, f"generation failed: {type(err).__name__}: {err}")
                continue
            r.set_hidden(hidden)
            r.pending, r.state = first[0], RequestState.DECODING
            self._emit_safely(r, first)

    def _emit(self, r: Request, tokens: list[int]) -> None:
        if (reason := emit_tokens(r, tokens, self.eos_ids, self.counters)) is not None:
            self._finish(r, reason)
            return
        self.speculation.resolve_probes(r, final=False)

    def _finish(self, r: Request, reason: FinishReason, error: str | None = None,
                error_type: str | None = None) -> None:
        if r.handle.finished is not None:
            return
        self.speculation.resolve_probes(r, final=True)
        if r in self.active:
            self.active.remove(r)
        if r.slot is not None:
            if not self.admission.keeps_slot(r, reason):
                self.prefix.release(self, r, reason)  # kept for reuse, or freed
            r.slot = None
        self.counters[reason.counter] += 1
        r.handle.push(r.finished(reason, error, error_type))

    def finish_all(self, reason: FinishReason, error: str, error_type: str | None = None) -> None:
        with self.cond:
            pending = list(self.waiting) + list(self.active)
            self.waiting.clear()
        for r in pending:
            try:
                self._finish(r, reason, error, error_type)
            except BaseException:  # the runner may be broken; the caller must still get an answer
                r.handle.push(r.finished(reason, error, error_type))
        self.active.clear()
