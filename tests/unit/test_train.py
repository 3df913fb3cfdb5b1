"""The self-distillation pipeline on a tiny random Llama: answers -> features -> heads -> acceptance table."""

import json

import pytest
import torch
from helpers import ToyTokenizer, hf_greedy, tiny_llama

from nbkit.chat_format import user_prompt_ids
from nbkit.medusa.distill import compute_dtype, distill_with_hidden, fast_bf16, generate_answers
from nbkit.medusa.heads import MedusaHeads, load_heads, save_heads
from nbkit.medusa.train import (
    acceptance_table,
    active_vocab,
    compute_features,
    load_answers,
    load_hidden_chunks,
    train_heads,
)

PROMPTS = [f"prompt number {i} about {'abcdefgh'[i % 8] * (1 + i % 5)}" for i in range(24)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def answers_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "answers.jsonl"
    generate_answers(model, ToyTokenizer(), PROMPTS, path, max_new_tokens=40, batch_size=7, dtype=torch.float32)
    return path


def test_answers_are_the_models_greedy_continuations_and_generation_resumes(model, answers_file):
    tok = ToyTokenizer()
    rows = [json.loads(line) for line in answers_file.open()]
    assert sorted(r["prompt"] for r in rows) == sorted(PROMPTS)
    for r in rows[:6]:
        ids = user_prompt_ids(tok, r["prompt"])
        assert r["prompt_ids"] == ids
        ref = hf_greedy(model, ids, 40)  # batched, left-padded generation = the same greedy answer
        assert r["answer_ids"] == (ref[: ref.index(1) + 1] if 1 in ref else ref)
    generate_answers(model, tok, PROMPTS + ["one more prompt"], answers_file, max_new_tokens=40, dtype=torch.float32)
    rows = [json.loads(line) for line in answers_file.open()]
    assert len(rows) == len(PROMPTS) + 1  # only the new prompt was generated


def test_features_are_the_final_norm_states_and_next_tokens(model, answers_file):
    answers = load_answers(answers_file)
    f = compute_features(model, answers, batch_tokens=256)
    assert len(f.next_tokens) == sum(len(a) for _, a in answers) == len(f.hidden)
    # the first sequence in file order occupies the first positions
    p, a = answers[0]
    with torch.inference_mode():
        ref = model.model(input_ids=torch.tensor([p + a])).last_hidden_state[0]
    torch.testing.assert_close(f.hidden[: len(a)].float(), ref[len(p) - 1 : len(p) + len(a) - 1], atol=2e-2, rtol=2e-2)
    assert f.next_tokens[: len(a)].tolist() == a
    assert (f.seq_end[: len(a)] == len(a)).all()


@pytest.mark.slow  # many samples or an epoch of training: out of `make test-fast`
@pytest.mark.tiny
def test_trained_heads_predict_far_better_than_untrained_ones(model, answers_file, tmp_path):
    f = compute_features(model, load_answers(answers_file), batch_tokens=256)
    lm_head = model.get_output_embeddings()
    untrained = acceptance_table(f, MedusaHeads(model.config.hidden_size, 3).eval(), lm_head)
    # A random tiny model's distributions are nearly flat, so the test trains on its argmax (teacher_topk=1)
    # and checks that the heads learn the model's own continuations of the training answers.
    heads = train_heads(f, lm_head, n_heads=3, n_layers=3, epochs=60, batch_size=128, lr=1e-2, negatives=64,
                        teacher_topk=1, log_every=10_000)
    trained = acceptance_table(f, heads, lm_head)
    for k in range(3):
        assert trained["top1_accuracy"][k] >= untrained["top1_accuracy"][k] + 0.3, (trained, untrained)
    q = torch.tensor(trained["acceptance_q"])
    assert q.shape == (3, 10) and (q >= 0).all() and (q.sum(-1) <= 1 + 1e-6).all()
    assert abs(q[0, 0] - trained["top1_accuracy"][0]) < 1e-3  # depth 0 is reached at every position
    # saved with its proposal vocabulary, reloaded, it scores the same
    vocab = active_vocab(f).tolist()
    save_heads(heads, tmp_path, proposal_vocab=vocab, dtype=torch.bfloat16)
    reloaded = load_heads(tmp_path, model.config.hidden_size)
    assert reloaded.proposal_vocab.tolist() == sorted(vocab)
    again = acceptance_table(f, reloaded, lm_head)
    assert abs(again["top1_accuracy"][0] - trained["top1_accuracy"][0]) < 0.05


def test_fused_distillation_gives_the_same_answers_and_features_as_the_two_pass_pipeline(model, answers_file,
                                                                                         tmp_path):
    """distill_with_hidden (one fp32 pass) = generate_answers + compute_features, and it resumes."""
    tok = ToyTokenizer()
    distill_with_hidden(model, tok, PROMPTS[:10], tmp_path, max_new_tokens=40, batch_size=4)
    distill_with_hidden(model, tok, PROMPTS, tmp_path, max_new_tokens=40, batch_size=4)  # only the 14 new ones
    fused = {json.loads(line)["prompt"]: json.loads(line)["answer_ids"] for line in (tmp_path / "answers.jsonl").open()}
    assert len(fused) == len(PROMPTS) == sum(1 for _ in (tmp_path / "answers.jsonl").open())
    two_pass = {r["prompt"]: r["answer_ids"] for r in map(json.loads, answers_file.open())}
    assert all(fused[p] == two_pass[p] for p in PROMPTS)
    keep = set(PROMPTS[3:9])
    f = load_hidden_chunks(tmp_path, keep)
    assert len(f.hidden) == len(f.next_tokens) == sum(len(fused[p]) for p in keep if len(fused[p]) > 1)
    for prompt in PROMPTS[3:5]:  # spot-check against a plain forward over prompt + answer
        p, a = user_prompt_ids(tok, prompt), fused[prompt]
        with torch.inference_mode():
            ref = model.model(input_ids=torch.tensor([p + a])).last_hidden_state[0, len(p) - 1 : len(p) + len(a) - 1]
        rows = (f.next_tokens.unfold(0, len(a), 1) == torch.tensor(a)).all(-1).nonzero()
        start = int(rows[0, 0])
        torch.testing.assert_close(f.hidden[start : start + len(a)].float(), ref, atol=2e-2, rtol=2e-2)
        assert (f.seq_end[start : start + len(a)] == start + len(a)).all()


def test_warm_start_begins_from_the_given_heads(model, answers_file):
    f = compute_features(model, load_answers(answers_file), batch_tokens=256)
    init = MedusaHeads(model.config.hidden_size, 2, 2).eval()
    lm_head = model.get_output_embeddings()
    tuned = train_heads(f, lm_head, n_heads=2, n_layers=2, epochs=0.01, batch_size=16, lr=1e-9, negatives=8,
                        log_every=10_000, init=init)
    for (name, a), b in zip(tuned.state_dict().items(), init.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("cpuinfo,fast", [("flags : fpu avx2 fma", False), ("flags : avx512f avx512_bf16", True),
                                          ("flags : amx_tile amx_bf16", True), (OSError("no /proc"), False)])
def test_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, cpuinfo, fast):
    import nbkit.medusa.distill as distill

    class CpuInfo:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self):
            if isinstance(cpuinfo, Exception):
                raise cpuinfo
            return cpuinfo

    monkeypatch.setattr(distill, "Path", CpuInfo)
    assert fast_bf16() is fast
    assert compute_dtype() == (torch.bfloat16 if fast else torch.float32)
