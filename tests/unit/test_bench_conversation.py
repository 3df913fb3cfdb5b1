"""The conversation benchmark (nbkit/bench/conversation.py): chats chained from MT-Bench's format, the
configurations it compares, what it reads from a stream, its summary and verdicts; then `--quick` end to end
against real `nbkit serve` subprocesses (the embedded SmolLM2 on the torch engine; the vicuna miniature on
both engines) and against a stand-in for llama-server. Timings are only checked for presence and order; the
prompt token counts show that each answer was fed back as history."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest

from nbkit.bench import chats as C
from nbkit.bench import conversation as conv
from nbkit.bench import servers as S
from nbkit.bench.servers import Config, Engine, Reuse

ROWS = [  # MT-Bench's format, the project's own text
    {"question_id": 3, "category": "writing", "turns": ["Write two lines about rain.", "Make them rhyme."]},
    {"question_id": 1, "category": "writing", "turns": ["Name a colour.", "Name another one."]},
    {"question_id": 2, "category": "writing", "turns": ["Say hello in French.", "Now in Spanish."]},
    {"question_id": 4, "category": "writing", "turns": ["Count to three.", "Backwards."]},
    {"question_id": 5, "category": "math", "turns": ["What is 2 + 2?", "And times 3?"]},
    {"question_id": 6, "category": "math", "turns": ["What is 10 - 7?", "Square it."]},
    {"question_id": 7, "category": "math", "turns": ["Is 7 prime?", "Why?"]},
]


def write_questions(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chats_chain_whole_questions_of_one_category_in_id_order_alternating_categories():
    chats = C.chain(ROWS, turns=6)
    assert [c.name for c in chats] == ["writing-1-2-3", "math-5-6-7"]  # writing's 4th question is left over
    assert chats[0].turns == ("Name a colour.", "Name another one.", "Say hello in French.", "Now in Spanish.",
                              "Write two lines about rain.", "Make them rhyme.")
    assert [c.name for c in C.chain(ROWS, turns=4)] == ["writing-1-2", "math-5-6", "writing-3-4"]


def test_questions_file_is_checked_and_its_absence_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_PROMPTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="docs/bench/sources.md"):
        C.read_questions()
    write_questions(tmp_path / C.MT_BENCH_FILE)  # not the recorded file: refused from the prompts folder
    with pytest.raises(ValueError, match="sha256"):
        C.read_questions()
    assert hashlib.sha256((tmp_path / C.MT_BENCH_FILE).read_bytes()).hexdigest() != C.MT_BENCH_SHA256
    assert C.read_questions(tmp_path / C.MT_BENCH_FILE) == ROWS  # a path given explicitly is read as it is
    assert conv.main(["--questions", str(tmp_path / "absent.jsonl")]) == 2


def test_configurations_follow_the_prefix_cache_switch():
    help_with = "options:\n  --no-prefix-cache     compute every prompt whole\n  --max-batch MAX_BATCH"
    assert S.has_prefix_cache_switch(help_with) and not S.has_prefix_cache_switch("  --max-batch MAX_BATCH")
    engines = [Engine.TORCH, Engine.LLAMACPP, Engine.LLAMA_SERVER]
    assert [c.name for c in S.configurations(engines, switch=True)] == [
        "torch reuse on", "torch reuse off", "llamacpp reuse on", "llamacpp reuse off",
        "llama-server cache_prompt on", "llama-server cache_prompt off"]
    assert [c.name for c in S.configurations(engines, switch=False, llama_server_off=False)] == [
        "torch as is", "llamacpp as is", "llama-server cache_prompt on"]


def test_commands_and_bodies_toggle_reuse_only_where_asked():
    on, off = Config(Engine.TORCH, Reuse.ON), Config(Engine.LLAMACPP, Reuse.OFF)
    assert S.NO_PREFIX_CACHE not in S.nbkit_command(on, 8000, None, None, "adaptive", 16)
    cmd = S.nbkit_command(off, 8000, "m.gguf", "none", "off", 16, ["--device", "cuda"])
    assert cmd[-3:] == ["--device", "cuda", S.NO_PREFIX_CACHE] and cmd[cmd.index("--engine") + 1] == "llamacpp"
    assert cmd[cmd.index("--model") + 1] == "m.gguf" and cmd[cmd.index("--speculation") + 1] == "off"
    llama = S.llama_server_command(Path("/x/llama-server"), Path("m.gguf"), 9000, 4, 2048, 1, ["-ngl", "99"])
    assert llama[llama.index("-np") + 1] == "4" and llama[llama.index("-c") + 1] == "8192"
    assert "--jinja" in llama and llama[-2:] == ["-ngl", "99"] and llama[llama.index("-t") + 1] == "1"
    messages = [{"role": "user", "content": "hi"}]
    assert "cache_prompt" not in conv.request_body(on, messages, 8)  # nbkit's strict schema would refuse it
    assert conv.request_body(Config(Engine.LLAMA_SERVER, Reuse.ON), messages, 8)["cache_prompt"] is True
    assert conv.request_body(Config(Engine.LLAMA_SERVER, Reuse.OFF), messages, 8)["cache_prompt"] is False


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


@pytest.mark.parametrize("final", [
    {"usage": {"prompt_tokens": 30, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 24}}},
    {"usage": {"prompt_tokens": 30, "completion_tokens": 2}, "timings": {"cache_n": 24, "prompt_n": 6}},
])
def test_a_turn_times_the_first_text_not_the_role_chunk_and_reads_usage(final):
    body = _sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
                {"choices": [], **final}, "[DONE]")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as http:
            return await conv.chat_turn(http, Config(Engine.LLAMA_SERVER, Reuse.ON), [{"role": "user", "content": "q"}], 2)

    turn = asyncio.run(go())
    assert turn.text == "Hello" and turn.completion_tokens == 2 and turn.prompt_tokens == 30
    assert turn.cached_tokens == 24 and 0 <= turn.ttft <= turn.seconds
    assert seen[0]["stream_options"] == {"include_usage": True} and seen[0]["temperature"] == 0.0


def _turn(ttft: float, text: str = "a", prompt: int = 10) -> conv.Turn:
    return conv.Turn(ttft=ttft, seconds=ttft + 1, completion_tokens=4, prompt_tokens=prompt, cached_tokens=None,
                     text=text)


def test_summary_medians_ratio_verdicts_and_table():
    chats = [[_turn(0.1), _turn(0.2), _turn(0.3)], [_turn(0.3), _turn(0.2), _turn(0.5)],
             [_turn(0.2), _turn(0.9, "b"), _turn(0.4)]]
    s = conv.summarize(chats, seconds=6.0)
    assert s["ttft_s"] == [0.2, 0.2, 0.4] and s["last_over_first"] == 2.0
    assert s["output_tokens"] == 36 and s["tokens_per_s"] == 6.0 and s["turns"] == 3 and s["chats"] == 3
    same = [[_turn(0.1), _turn(0.2), _turn(0.3)]] * 3
    assert conv.differing_answers(chats, same) == 1
    fast = conv.summarize([[_turn(0.2), _turn(0.25)]], 1.0)
    summaries = {"torch reuse on": s, "llamacpp reuse on": fast}
    verdicts = conv.verdicts(summaries, switch=True)
    assert verdicts["torch"].startswith("NOT met: 2.00") and verdicts["llamacpp"].startswith("met: 1.25")
    assert conv.verdicts({"torch as is": s}, switch=False)["torch"].startswith("not measured")
    table = conv.markdown({"torch reuse on": s}, {"torch reuse on": 1})
    assert "| 3 | 400 ms (10 tok) |" in table and "| turn 3 / turn 1 | 2.00 |" in table
    assert "| answers differing from reuse off | 1 |" in table


def check_history_fed_back(report: dict, name: str, n_turns: int) -> list[dict]:
    """Each turn's prompt holds the previous prompt, its answer and a new question: it grows by more than the
    answer's tokens. Every turn answered, its first text no later than its end."""
    turns = report["answers"][name][0]
    assert len(turns) == n_turns
    for before, after in zip(turns, turns[1:]):
        assert after["prompt_tokens"] > before["prompt_tokens"] + before["completion_tokens"], name
    assert all(t["text"] and 0 < t["ttft"] <= t["seconds"] for t in turns), name
    return turns


@pytest.mark.slow
def test_quick_run_on_the_embedded_model_torch_engine(tmp_path, embedded, monkeypatch):
    from nbkit.chat_format import chat_prompt_ids

    monkeypatch.setenv("NBKIT_API_KEY", "a key of the caller's")  # not passed on: the client sends none
    out = tmp_path / "conv.json"
    args = ["--quick", "--engines", "torch", "--threads", "1", "--speculation", "off",  # off: no calibration
            "--questions", str(write_questions(tmp_path / "q.jsonl")), "--out", str(out)]
    assert conv.main(args) == 0
    report = json.loads(out.read_text())
    switch = report["prefix_cache_switch"]
    assert switch == S.has_prefix_cache_switch(S.serve_help())
    names = ["torch reuse on", "torch reuse off"] if switch else ["torch as is"]
    assert list(report["configurations"]) == names and report["settings"]["max_tokens"] == 8
    tokenizer, messages = embedded[1], []
    for name in names:
        turns = check_history_fed_back(report, name, 6)
        assert report["configurations"][name]["prompt_tokens"] == [t["prompt_tokens"] for t in turns]
    for user, turn in zip(C.chain(ROWS)[0].turns, turns):  # the exact history: the server counts its tokens
        messages.append({"role": "user", "content": user})
        assert turn["prompt_tokens"] == len(chat_prompt_ids(tokenizer, messages))
        messages.append({"role": "assistant", "content": turn["text"]})
    if switch:  # greedy: reusing a prefix must not change an answer
        assert report["differing_from_reuse_off"] == {"torch reuse on": 0}
        assert report["target"]["torch"].split(":")[0] in ("met", "NOT met")
    else:
        assert report["target"]["torch"].startswith("not measured")


@pytest.mark.slow
def test_quick_run_on_the_vicuna_miniature_both_engines(tmp_path, vicuna_mirror, monkeypatch):
    """Llama with sentencepiece, BOS and no chat template of its own (FastChat's vicuna_v1.1 is rendered),
    fetched by its hub id through the mirror, on both engines; the exact history is checked with the
    repository's own tokenizer."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")
    from transformers import AutoTokenizer
    from vicuna_mini import BASE_ID

    from nbkit.chat_format import chat_prompt_ids

    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(vicuna_mirror))
    out = tmp_path / "conv.json"
    args = ["--quick", "--engines", "torch,llamacpp", "--threads", "1", "--speculation", "off", "--model", BASE_ID,
            "--questions", str(write_questions(tmp_path / "q.jsonl")), "--out", str(out)]
    assert conv.main(args) == 0
    report = json.loads(out.read_text())
    tokenizer = AutoTokenizer.from_pretrained(vicuna_mirror / BASE_ID)
    names = [n for n in report["configurations"]]
    assert [n.split()[0] for n in names] == (["torch", "torch", "llamacpp", "llamacpp"]
                                             if report["prefix_cache_switch"] else ["torch", "llamacpp"])
    for name in names:
        messages = []
        for user, turn in zip(C.chain(ROWS)[0].turns, check_history_fed_back(report, name, 6)):
            messages.append({"role": "user", "content": user})
            assert turn["prompt_tokens"] == len(chat_prompt_ids(tokenizer, messages)), name
            messages.append({"role": "assistant", "content": turn["text"]})


FAKE_LLAMA_SERVER = Path(__file__).parents[1] / "helpers" / "fake_llama_server.py"


def test_llama_server_configurations_send_cache_prompt_and_read_its_timings(tmp_path):
    """The llama-server path (launch with its command line, /health, cache_prompt, timings.cache_n) against a
    stand-in that reuses a prompt's prefix only when asked to."""
    out = tmp_path / "conv.json"
    args = ["--quick", "--engines", "llama-server", "--llama-server", str(FAKE_LLAMA_SERVER), "--max-tokens", "3",
            "--questions", str(write_questions(tmp_path / "q.jsonl")), "--out", str(out)]
    assert conv.main(args) == 0
    report = json.loads(out.read_text())
    on, off = "llama-server cache_prompt on", "llama-server cache_prompt off"
    assert list(report["configurations"]) == [on, off] and report["differing_from_reuse_off"] == {on: 0}
    for name in (on, off):
        check_history_fed_back(report, name, 6)
    s_on, s_off = report["configurations"][on], report["configurations"][off]
    assert s_on["prompt_tokens"] == s_off["prompt_tokens"]
    assert s_off["cached_tokens"] == [0] * 6
    # with the cache: each turn reuses the whole previous prompt (the warm-up's shares its first word)
    assert s_on["cached_tokens"] == [1, *s_on["prompt_tokens"][:-1]]
    assert "| turn 6 / turn 1 |" in report["table"] and report["target"] == {}
