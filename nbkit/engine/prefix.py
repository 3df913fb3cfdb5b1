"""Prefix reuse: a prompt that starts with tokens already in some slot's KV prefills only the rest.

The KV a finished request leaves in its slot is kept ("retained", least recently used first) with the token ids
it holds. A new request takes the longest match over the retained slots and the running requests' prefilled
prompts: a retained slot is taken over and truncated to the match (no copy), another slot's prefix is copied into
a new slot (the runner's optional `truncate` / `copy_prefix`; without them there is no reuse). Prefill then
starts at the match, and always keeps the prompt's last token to compute (its logits give the first token).
Requests that share a prompt and arrive together (the n choices of one request, a shared system prompt) let the
first prefill it: the others wait until its KV is there, then copy it.

Retained slots count against the slots and the KV cells: the least recently used is evicted (its slot freed)
before a request would wait for room. Runners know nothing of this: they keep KV; this module decides whose.
"""

from __future__ import annotations

from collections import OrderedDict

from .admission import cells_free
from .request import FinishReason, Request, RequestState
from .runner import runner_member

REUSABLE = (FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE, FinishReason.LENGTH)  # KV left complete


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists (a binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    """Which slots' KV a new prompt may reuse, and the counters /metrics and /info show."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.retained: OrderedDict[int, list[int]] = OrderedDict()  # slot -> token ids in its KV; LRU first
        self.runner = None  # the runner the retained slots belong to (a crashed engine's reset drops them)
        self.prompt_tokens = self.cached_tokens = self.hits = self.requests = self.evictions = 0

    def active(self, engine) -> bool:
        """Whether reuse is on and the engine's runner can truncate and copy KV; forgets a replaced runner's slots."""
        if engine.runner is not self.runner:
            self.retained.clear()
            self.runner = engine.runner
        return (self.enabled and runner_member(engine.runner, "truncate") is not None
                and runner_member(engine.runner, "copy_prefix") is not None)

    # ---- admission (Engine._admit) ---------------------------------------------------------
    def fits(self, engine, req: Request) -> bool:
        """Whether `req` fits the KV cells beside the active requests and the retained slots, evicting the least
        recently used retained slots (the one `req` would take over last) until it does. A slot taken over counts
        its cells past the match: truncating frees them (exact mode parks them until no slot holds cells)."""
        if not self.active(engine):
            return cells_free(req, engine.active, engine.runner, engine._tree_reserve)
        keep, n = self._source(engine, req)
        while True:
            shared = n if keep in self.retained else 0  # in req's own reservation already
            if cells_free(req, engine.active, engine.runner, engine._tree_reserve, self.held_tokens() - shared):
                return True
            if not self._evict(engine, protect=keep):
                if keep not in self.retained:
                    return False
                keep = None  # the match's own slot must go too

    def place(self, engine, req: Request) -> int:
        """A slot for `req`, holding the longest prefix of its prompt found (req.n_prefilled starts there)."""
        if not self.active(engine):
            return engine.runner.alloc()
        src, n = self._source(engine, req)
        if src is not None and src in self.retained:
            del self.retained[src]
            engine.runner.truncate(src, n)
            slot = src
        else:
            slot = self._alloc(engine)
            if src is not None:
                engine.runner.copy_prefix(src, slot, n)
        req.n_prefilled = req.cached_tokens = n if src is not None else 0
        return slot

    def _source(self, engine, req: Request, exclude: Request | None = None) -> tuple[int | None, int]:
        """(slot, tokens) of the longest reusable prefix of `req`'s prompt; (None, 0) when none. At most all but
        the prompt's last token (its logits give the first token); a retained slot wins ties (no copy)."""
        limit, best = len(req.prompt_ids) - 1, (None, 0)
        for slot, held in self.retained.items():
            n = min(common_prefix(req.prompt_ids, held), limit)
            if n > best[1]:
                best = (slot, n)
        for r in engine.active:
            if r is not req and r is not exclude and r.slot is not None:
                n = min(common_prefix(req.prompt_ids, r.prompt_ids[: r.n_prefilled]), limit)
                if n > best[1]:
                    best = (r.slot, n)
        return best

    def alloc(self, engine) -> int:
        """A free slot, evicting the least recently used retained one when there is none."""
        return self._alloc(engine)

    def evict_lru(self, engine) -> bool:
        """Free the least recently used retained slot (False: none is retained)."""
        return self._evict(engine)

    def _alloc(self, engine) -> int:
        while True:
            try:
                return engine.runner.alloc()
            except RuntimeError:  # every slot is running or retained: the least recently used goes
                if not self._evict(engine):
                    raise

    def _evict(self, engine, protect: int | None = None) -> bool:
        victim = next((s for s in self.retained if s != protect), None)
        if victim is None:
            return False
        del self.retained[victim]
        engine.runner.free(victim)
        self.evictions += 1
        return True

    # ---- prefill (Engine._prefill) ---------------------------------------------------------
    def prefilling(self, engine) -> list[Request]:
        """The PREFILLING requests that prefill this step, FIFO. One that has prefilled nothing of its own first
        copies any longer prefix now in KV, and waits while an earlier request is prefilling a longer one."""
        ready = [r for r in engine.active if r.state is RequestState.PREFILLING]
        if not self.active(engine):
            return ready
        out: list[Request] = []
        for r in ready:
            if r.n_prefilled != r.cached_tokens:  # prefilling its own tokens already
                out.append(r)
                continue
            src, n = self._source(engine, r)
            if n > r.n_prefilled:
                engine.runner.copy_prefix(src, r.slot, n)
                r.n_prefilled = r.cached_tokens = n
            limit = len(r.prompt_ids) - 1
            if not any(min(common_prefix(r.prompt_ids, lead.prompt_ids), limit) > r.n_prefilled for lead in out):
                out.append(r)
        return out

    # ---- the end of a request (Engine._finish) ----------------------------------------------
    def release(self, engine, r: Request, reason: FinishReason) -> None:
        """Keep the slot of a request that ended normally (its KV is complete) as retained; free any other."""
        self.requests += 1
        self.prompt_tokens += len(r.prompt_ids)
        self.cached_tokens += r.cached_tokens
        self.hits += r.cached_tokens > 0
        if not self.active(engine) or reason not in REUSABLE:
            engine.runner.free(r.slot)
            return
        held = engine.runner.length(r.slot)
        self.retained[r.slot] = (r.prompt_ids + r.output_ids)[:held]
        engine.runner.truncate(r.slot, len(self.retained[r.slot]))  # KV past the known ids (a stop mid-step)

    def clear(self, engine) -> None:
        """Free every retained slot (their KV is dropped)."""
        while self._evict(engine):
            pass

    def held_tokens(self) -> int:
        return sum(map(len, self.retained.values()))

    def snapshot(self) -> dict:
        """Counters for /metrics, /info and the engine's log line (prefix_hit_rate: cached / prompt tokens)."""
        return {"prefix_cache": self.enabled, "prefix_cached_tokens": self.cached_tokens,
                "prefix_hits": self.hits, "prefix_hit_rate": self.cached_tokens / self.prompt_tokens
                if self.prompt_tokens else 0.0, "prefix_evictions": self.evictions,
                "prefix_retained_slots": len(self.retained), "prefix_retained_tokens": self.held_tokens()}
