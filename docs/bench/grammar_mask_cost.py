"""Per-token mask cost of xgrammar and llguidance on the embedded tokenizer (docs/measurements.md).

    PYTHONPATH=. python docs/bench/grammar_mask_cost.py
"""

import json
import statistics
import time

import llguidance
import llguidance.hf
import llguidance.torch
import xgrammar

from nbkit.models import load_model

SCHEMA = json.dumps({"type": "object", "properties": {"city": {"type": "string"},
                                                      "tags": {"type": "array", "items": {"type": "string"}}},
                     "required": ["city", "tags"]})
REPEATS = 7
TEXT = '{"city": "Paris is a big city", "tags": ["a", "bb", "ccc"]}'


def xgrammar_cost(tok, ids: list[int]) -> tuple[float, float]:
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    t0 = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info, max_threads=1).compile_json_schema(SCHEMA, any_whitespace=True)
    compile_s = time.perf_counter() - t0
    matcher, bitmask = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, len(tok))
    t0 = time.perf_counter()
    for i in ids:
        matcher.fill_next_token_bitmask(bitmask)
        assert matcher.accept_token(i)
    return compile_s, (time.perf_counter() - t0) / len(ids)


def llguidance_cost(tok, ids: list[int]) -> tuple[float, float]:
    lltok = llguidance.hf.from_tokenizer(tok)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": True})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    t0 = time.perf_counter()
    for i in ids:
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        assert matcher.consume_token(i), matcher.get_error()
    return compile_s, (time.perf_counter() - t0) / len(ids)


def main() -> None:
    _, tok = load_model()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    runs = {"xgrammar": [], "llguidance": []}
    for _ in range(REPEATS):  # interleaved, fresh matchers: a loaded machine hits both alike
        runs["xgrammar"].append(xgrammar_cost(tok, ids))
        runs["llguidance"].append(llguidance_cost(tok, ids))
    for name, results in runs.items():
        compile_s = statistics.median(r[0] for r in results)
        per_token = statistics.median(r[1] for r in results)
        print(f"{name}: compile {compile_s * 1e3:.0f} ms, mask+advance {per_token * 1e6:.0f} us/token "
              f"(median of {REPEATS}, {len(ids)} tokens each)")


if __name__ == "__main__":
    main()
