"""Prompt sources: dedup on normalised text, a deterministic hash split, the public-file parsers and loader."""

from __future__ import annotations

import hashlib
import json

import pytest

from nbkit.medusa import prompts as P

SELF_INSTRUCT = [
    {"id": "t0", "instruction": "Rewrite the sentence more clearly.", "instances": [{"input": "It is what it is.",
                                                                                      "output": "x"}]},
    {"id": "t1", "instruction": "Suggest a name for a cat.", "instances": [{"input": "", "output": "Tom"}]},
    {"id": "t2", "instruction": "suggest a NAME for a cat!", "instances": [{"input": "", "output": "Tom"}]},
]
DOLLY = [
    {"instruction": "When did the airline start?", "context": "It started in 2000.", "response": "2000",
     "category": "closed_qa"},
    {"instruction": "Which is a fish? Tope or Rope", "context": "", "response": "Tope", "category": "classification"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_normalize_folds_case_accents_punctuation_and_spaces():
    assert P.normalize("  Café?  Crème!\n") == P.normalize("cafe creme") == "cafe creme"
    assert P.normalize("a-b") != P.normalize("ab")


def test_dedup_keeps_first_occurrence_and_drops_empty():
    assert P.dedup(["Hello world.", "", "hello   WORLD", "Other", "  ?! "]) == ["Hello world.", "Other"]


def test_split_is_deterministic_disjoint_and_order_independent():
    prompts = [f"Question number {i} about topic {i % 7}?" for i in range(400)]
    train, held = P.split(prompts, 0.25, salt="s")
    assert not {P.normalize(p) for p in train} & {P.normalize(p) for p in held}
    assert len(train) + len(held) == 400
    assert 60 < len(held) < 140  # about a quarter
    train2, held2 = P.split(list(reversed(prompts)) + ["question NUMBER 3 about topic 3"], 0.25, salt="s")
    assert set(held2) == set(held) and set(train2) == set(train)
    assert set(P.split(prompts, 0.25, salt="other")[1]) != set(held)


def test_split_keeps_near_duplicates_on_one_side():
    train, held = P.split(["Explain gravity.", "explain GRAVITY", "Explain tides."], 0.5)
    assert len(train) + len(held) == 2


def test_self_instruct_and_dolly_parsers(tmp_path):
    lines = write_jsonl(tmp_path / "s.jsonl", SELF_INSTRUCT).read_text().splitlines()
    assert P.parse_self_instruct(lines)[0] == "Rewrite the sentence more clearly.\n\nIt is what it is."
    assert P.parse_self_instruct(lines)[1] == "Suggest a name for a cat."
    dolly = P.parse_dolly(write_jsonl(tmp_path / "d.jsonl", DOLLY).read_text().splitlines())
    assert dolly == ["When did the airline start?\n\nIt started in 2000.", "Which is a fish? Tope or Rope"]


def test_load_public_from_folder_dedups_and_checks_the_recorded_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_PROMPTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="user_oriented"):
        P.load_public("user_oriented")
    write_jsonl(tmp_path / "user_oriented_instructions.jsonl", SELF_INSTRUCT)
    with pytest.raises(ValueError, match="sha256"):  # not the recorded file
        P.load_public("user_oriented")
    # dolly has no recorded hash: any file in its format loads
    write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", DOLLY + DOLLY)
    assert len(P.load_public("dolly")) == 2


def test_load_public_explicit_path_and_recorded_hash_matches(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "mine.jsonl", SELF_INSTRUCT)
    assert P.load_public("user_oriented", path) == P.parse_self_instruct(path.read_text().splitlines())[:2]
    monkeypatch.setenv("NBKIT_PROMPTS_DIR", str(tmp_path))
    monkeypatch.setitem(P.PUBLIC_SOURCES, "user_oriented", P.PublicSource(
        "user_oriented", "mine.jsonl", P.parse_self_instruct, "measure", "test", "test",
        hashlib.sha256(path.read_bytes()).hexdigest()))
    assert len(P.load_public("user_oriented")) == 2


def test_source_prompts_roles(tmp_path):
    train, held = P.source_prompts("templates")
    assert held and not set(held) & set(train) and not set(held) & set(P.EXTRA_EVAL_PROMPTS)
    assert P.source_prompts("handwritten") == ([], P.EXTRA_EVAL_PROMPTS)
    measure = write_jsonl(tmp_path / "m.jsonl", SELF_INSTRUCT)
    assert P.source_prompts("user_oriented", measure)[0] == []  # measuring only: nothing to train on
    rows = [{"instruction": f"Task {i}: do thing {i}.", "context": ""} for i in range(200)]
    train, held = P.source_prompts("dolly", write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(train) + len(held) == 200 and 5 < len(held) < 40
    # a public file's held-out prompts come in the order of their normalised text's sha256 (mixing its groups)
    by_hash = sorted(held, key=lambda p: hashlib.sha256(P.normalize(p).encode()).digest())
    assert P.held_out_prompts("dolly", 3, tmp_path / "d.jsonl") == by_hash[:3] and by_hash[:3] != held[:3]
    with pytest.raises(KeyError, match="known"):
        P.source_prompts("mt_bench")


def test_parse_source_list():
    assert P.parse_source_list("templates, handwritten") == ["templates", "handwritten"]
    assert P.parse_source_list("all") == list(P.SOURCE_NAMES)
    with pytest.raises(ValueError, match="known"):
        P.parse_source_list("templates,nope")
    with pytest.raises(ValueError):
        P.parse_source_list(" , ")


def test_training_prompts_mix_sources_and_never_include_measuring_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_PROMPTS_DIR", str(tmp_path))
    template_train = P.source_prompts("templates")[0]
    rows = [{"instruction": p, "context": ""} for p in template_train[:5]]  # overlaps the templates
    rows += [{"instruction": f"Human task {i}.", "context": ""} for i in range(100)]
    rows += [{"instruction": p.upper(), "context": ""} for p in P.EXTRA_EVAL_PROMPTS[:3]]  # a measured set leaks in
    write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", rows)
    mixed = P.training_prompts(["templates", "dolly"])
    assert len(mixed) == len({P.normalize(p) for p in mixed})
    assert set(template_train) <= set(mixed) and any(p.startswith("Human task") for p in mixed)
    dolly_held = P.held_out_prompts("dolly")
    assert dolly_held and not set(dolly_held) & set(mixed)
    leaked = {P.normalize(p) for p in P.EXTRA_EVAL_PROMPTS}
    assert {P.normalize(p) for p in P.training_prompts(["dolly"])} & leaked
    assert not {P.normalize(p) for p in P.training_prompts(["dolly"], exclude=["handwritten"])} & leaked
    for bad in (["user_oriented"], ["handwritten"], ["templates", "user_oriented"]):
        with pytest.raises(ValueError, match="measuring only"):
            P.training_prompts(bad)


def test_gsm8k_and_clinc_parsers_take_only_the_prompts():
    gsm = [json.dumps({"question": " Tom has 3 apples. How many? ", "answer": "3\n#### 3"}), ""]
    assert P.parse_gsm8k(gsm) == ["Tom has 3 apples. How many?"]
    clinc = json.dumps({"train": [["how do i say hi in french", "translate"]], "val": [["what time is it", "time"]],
                        "oos_train": [["tell me a joke about cats", "oos"]], "test": [["never read", "x"]],
                        "oos_test": [["never read either", "oos"]]}, indent=1).splitlines()
    assert P.parse_clinc(clinc) == ["how do i say hi in french", "what time is it", "tell me a joke about cats"]


def test_public_training_sources_have_recorded_hashes_and_are_trainable():
    for name in ("gsm8k", "clinc_oos"):
        source = P.PUBLIC_SOURCES[name]
        assert source.role == "train" and len(source.sha256) == 64 and "commit" in source.origin


def test_mix_caps_keep_a_fixed_growing_sample_of_each_source(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_PROMPTS_DIR", str(tmp_path))
    monkeypatch.setitem(P.PUBLIC_SOURCES, "gsm8k", P.PublicSource(
        "gsm8k", "g.jsonl", P.parse_gsm8k, "train", "test", "test"))
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"question": f"Word problem {i}?"}) + "\n" for i in range(300)))
    assert P.parse_mix("templates:50, gsm8k") == {"templates": 50, "gsm8k": None}
    small = P.training_prompts(["templates", "gsm8k"], caps={"templates": 50, "gsm8k": 20})
    assert len(small) == 70
    big = P.training_prompts(["templates", "gsm8k"], caps={"templates": 80, "gsm8k": 40})
    assert set(small) <= set(big) and len(big) == 120  # a larger cap only adds prompts: distillation resumes
    assert not set(big) & set(P.held_out_prompts("gsm8k"))
    for bad in ("templates:x", "nope:3", ""):
        with pytest.raises(ValueError):
            P.parse_mix(bad)
