"""/tokenize and /detokenize round-trip on real tokenizers: the embedded SmolLM2 (byte-level BPE) and the
vicuna miniature (sentencepiece with byte fallback), and the served text is the decode of the served ids.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from nbkit.engine.loader import load_engine
from nbkit.engine.speculation import CostModel
from nbkit.server.launch import start_server

TEXT = "Héllo wörld! 日本語 🙂 and\n  spaces, ÄÖÜ."


@pytest.fixture(scope="module", params=["embedded", "vicuna"])
def served(request, one_torch_thread):
    if request.param == "embedded":
        engine = load_engine("torch", max_batch=2, cost_model=CostModel.from_function(lambda n: 0.03))
    else:
        from vicuna_mini import BASE_ID, HEADS_ID

        from nbkit.notebook import hub

        mirror = request.getfixturevalue("vicuna_mirror")
        prepared = hub.prepare(BASE_ID, HEADS_ID, SimpleNamespace(engine="torch", quantization="q8_0"),
                               mirror=mirror)
        engine = load_engine("torch", prepared.model, heads=prepared.heads, max_batch=2)
    handle = start_server(engine, port=0)
    with httpx.Client(base_url=handle.url, timeout=120) as http:
        yield SimpleNamespace(http=http, tok=engine.tokenizer, engine=engine)
    handle.stop()


def test_tokenize_detokenize_round_trip(served):
    http, tok = served.http, served.tok
    ids = http.post("/tokenize", json={"content": TEXT}).json()["tokens"]
    assert ids == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["content"] == tok.decode(ids) == TEXT
    with_bos = http.post("/tokenize", json={"content": TEXT, "add_special": True}).json()["tokens"]
    assert with_bos == served.engine.encode(TEXT)  # as a raw prompt is tokenized for generation
    assert http.post("/tokenize", json={"prompt": TEXT}).json()["tokens"] == with_bos  # vLLM's default: specials
    pieces = http.post("/tokenize", json={"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and [p["piece"] for p in pieces] == tok.convert_ids_to_tokens(ids)
    r = http.post("/detokenize", json={"tokens": [len(tok) + 5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_served_text_is_the_decode_of_the_served_ids(served):
    r = served.http.post("/generate", json={"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 24, "details": True, "do_sample": True, "temperature": 1.5, "seed": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [t["id"] for t in body["details"]["tokens"]]
    assert body["generated_text"] == served.tok.decode(ids, skip_special_tokens=True)
