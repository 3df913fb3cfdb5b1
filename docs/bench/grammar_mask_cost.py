"""Per-token mask cost of xgrammar and llguidance on the embedded tokenizer (docs/measurements.md)."""
import time, json, torch
from nbkit.models import load_model
import xgrammar, llguidance, llguidance.hf, llguidance.torch
_, tok = load_model()
schema = json.dumps({"type":"object","properties":{"city":{"type":"string"},"tags":{"type":"array","items":{"type":"string"}}},"required":["city","tags"]})
text = '{"city": "Paris is a big city", "tags": ["a", "bb", "ccc"]}'
ids = tok(text, add_special_tokens=False)["input_ids"]
V = len(tok)
# xgrammar
info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=V)
t=time.perf_counter(); cg = xgrammar.GrammarCompiler(info, max_threads=1).compile_json_schema(schema, any_whitespace=True); tc=time.perf_counter()-t
m = xgrammar.GrammarMatcher(cg); bm = xgrammar.allocate_token_bitmask(1, V)
t=time.perf_counter()
for i in ids:
    m.fill_next_token_bitmask(bm); assert m.accept_token(i)
x = (time.perf_counter()-t)/len(ids)
print(f"xgrammar: compile {tc*1e3:.0f} ms, mask+advance {x*1e6:.0f} us/token")
# llguidance
lt = llguidance.hf.from_tokenizer(tok)
t=time.perf_counter(); g = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True}); lm = llguidance.LLMatcher(lt, g); tc=time.perf_counter()-t
bm2 = llguidance.torch.allocate_token_bitmask(1, lt.vocab_size)
t=time.perf_counter()
for i in ids:
    llguidance.torch.fill_next_token_bitmask(lm, bm2, 0); assert lm.consume_token(i), lm.get_error()
x = (time.perf_counter()-t)/len(ids)
print(f"llguidance: compile {tc*1e3:.0f} ms, mask+advance {x*1e6:.0f} us/token")
