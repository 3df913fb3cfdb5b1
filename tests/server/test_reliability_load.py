"""Load and graceful stop of `python -m nbkit serve` on the embedded SmolLM2 (real weights, CPU).

One server process for the module, on the engine `nbkit serve` picks by default (llama.cpp for the
embedded GGUF on a CPU): 300 mixed requests at concurrency 64 against a queue far smaller than the load
(every request answered completely or refused with 429, none lost, none 5xx, answers equal to the same
server's greedy answer to the same prompt sent alone without speculation, memory back to its level), then
SIGTERM with requests in flight (each ends with its answer or a clear error, the process exits in
time). Traffic goes only to the 127.0.0.1 server started here; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from nbkit.bench.loadtest import PROMPTS, Job, make_jobs, markdown, run_load, solo_answers

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

KEY = "load-test-key-5f2a9c"
SECRETS = {"NBKIT_API_KEY": KEY, "HF_TOKEN": "hf_reliabilityFakeToken123456",
           "NGROK_AUTHTOKEN": "2abcFakeNgrokToken_reliability"}
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BATCH, MAX_QUEUE = 16, 8  # 24 requests at most in the server; the load keeps 64 at once
REQUESTS, CONCURRENCY = 300, 64
REQUEST_TIMEOUT = 120.0  # a request with no answer by then counts as lost
GEN_ROUTES = ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
# One torch thread in the server and here: on a shared 2-core machine two spinning threads per process
# make a step take 0.3 s or 15 s at random; one thread keeps the timings and the bounds meaningful.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
COMMAND = [sys.executable, "-m", "nbkit", "serve", "--port", "0", "--max-batch", str(MAX_BATCH),
           "--max-queue", str(MAX_QUEUE), "--rate-limit", "0", "--log-level", "info"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(COMMAND, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, **SECRETS, **ONE_THREAD))
    try:
        url, deadline = None, time.monotonic() + 480  # a first start calibrates; a loaded machine is slow
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            if m := re.search(r"nbkit serve: (http://127\.0\.0\.1:\d+)", log_path.read_text()):
                url = m.group(1)
            time.sleep(0.2)
        assert url, log_path.read_text()
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def route_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    return {status: sum(metric(text, "nbkit_requests_total", route=r, status=status) for r in GEN_ROUTES)
            for status in ("200", "429", "500", "503")}


def kv_cache_bytes(url: str) -> float:
    return metric(httpx.get(url + "/metrics", headers=AUTH, timeout=30).text, "nbkit_kv_cache_bytes")


def test_load_300_requests_at_concurrency_64(server):
    proc, url, log_path = server
    rss = psutil.Process(proc.pid)
    rss_loaded = rss.memory_info().rss
    assert httpx.get(url + "/info", headers=AUTH, timeout=10).json()["engine"] == "llamacpp"  # the default here
    # Warm-up: a full batch including the longest prompt, so the KV cache reaches the size this load
    # needs (it grows and is kept); memory is measured from here.
    longest = max(PROMPTS, key=len)
    warm_jobs = make_jobs(MAX_BATCH, seed=1) + [Job(-1, "chat", longest, 8, True),
                                                Job(-2, "completions", longest, 8, True)]
    warm = asyncio.run(run_load(url, warm_jobs, MAX_BATCH, timeout=REQUEST_TIMEOUT, api_key=KEY))
    assert warm.count("answered") == len(warm_jobs), warm.summary()
    # ... and the longest prompt alone: under no load the policy picks its largest tree, the most KV
    # positions one step of this load can ask for.
    alone = asyncio.run(run_load(url, warm_jobs[-2:], 1, timeout=REQUEST_TIMEOUT, api_key=KEY))
    assert alone.count("answered") == 2, alone.summary()
    rss_start, kv_start = rss.memory_info().rss, kv_cache_bytes(url)
    before = route_counts(url)

    jobs = make_jobs(REQUESTS, seed=0)
    report = asyncio.run(run_load(url, jobs, CONCURRENCY, timeout=REQUEST_TIMEOUT, deadline=600, api_key=KEY))
    summary = report.summary()
    print("\n" + markdown(report, "pytest tests/server/test_reliability_load.py (" + " ".join(COMMAND[1:]) + ")"))

    problems = [f"{o.kind} {o.job} status={o.status}: {o.detail}" for o in report.outcomes
                if o.kind in ("failed", "lost")]
    assert not problems, "\n".join(problems[:10])
    assert summary["sent"] == REQUESTS and summary["answered"] + summary["refused"] == REQUESTS
    assert summary["server_errors"] == 0
    assert summary["refused"] > 0, "the load should exceed the queue"
    assert summary["answered"] >= MAX_BATCH + MAX_QUEUE
    assert report.max_latency < REQUEST_TIMEOUT
    assert {o.job.route for o in report.outcomes if o.kind == "answered"} >= {"original", "chat_stream"}
    # The server counted the same answers: nothing vanished between client and engine.
    after = route_counts(url)
    assert after["200"] - before["200"] == summary["answered"]
    assert after["429"] - before["429"] == summary["refused"]
    assert after["500"] == before["500"] and after["503"] == before["503"]

    # Completed answers equal the same prompt's greedy answer, asked alone and without speculation.
    answered = [o for o in report.outcomes if o.kind == "answered"]
    reference = asyncio.run(solo_answers(url, [o.job for o in answered], api_key=KEY, timeout=REQUEST_TIMEOUT))
    wrong = [(o.job, o.text, reference[(o.job.prompt, o.job.chat, o.job.max_tokens)]) for o in answered
             if o.text != reference[(o.job.prompt, o.job.chat, o.job.max_tokens)]]
    assert not wrong, wrong[:5]

    # Healthy afterwards, nothing left running, memory back near its level before the load.
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    assert metric(metrics, "nbkit_batch_size") == 0 and metric(metrics, "nbkit_queue_size") == 0
    r = httpx.post(url + "/generate", json={"prompt": "The capital of France is", "max_tokens": 4}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200
    rss_end, kv_end = rss.memory_info().rss, kv_cache_bytes(url)
    print(f"server RSS: {rss_loaded / 2**20:.0f} MiB loaded, {rss_start / 2**20:.0f} MiB after warm-up, "
          f"{rss_end / 2**20:.0f} MiB after the load; KV cache {kv_start / 2**20:.0f} -> {kv_end / 2**20:.0f} MiB")
    # The KV cache grows to the longest sequence served and is kept (a tree under light load may reach
    # further than the warm-up did); everything else must come back near its level.
    assert kv_end >= kv_start > 0
    assert rss_end - kv_end < (rss_start - kv_start) * 1.10 + 64 * 2**20, (rss_start, kv_start, rss_end, kv_end)


def test_sigterm_finishes_or_cancels_inflight_requests_and_exits(server):
    proc, url, log_path = server
    results: dict[str, object] = {}

    def stream(name: str, max_tokens: int) -> None:
        events, start = [], time.monotonic()
        try:
            with httpx.stream("POST", url + "/generate_stream", headers=AUTH, timeout=60,
                              json={"prompt": "1, 2, 3, 4, 5,", "max_tokens": max_tokens}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:])
            results[name] = ("stream", r.status_code, events, time.monotonic() - start)
        except httpx.HTTPError as err:
            results[name] = ("stream", None, events + [repr(err)], time.monotonic() - start)

    def plain(name: str, max_tokens: int) -> None:
        start = time.monotonic()
        try:
            r = httpx.post(url + "/generate", headers=AUTH, timeout=60,
                           json={"prompt": "Count to three:", "max_tokens": max_tokens})
            results[name] = ("plain", r.status_code, r.json(), time.monotonic() - start)
        except httpx.HTTPError as err:
            results[name] = ("plain", None, repr(err), time.monotonic() - start)

    threads = [threading.Thread(target=stream, args=(f"long-stream-{i}", 400)) for i in range(3)]
    threads += [threading.Thread(target=plain, args=("long-plain", 400)),
                threading.Thread(target=plain, args=("short-plain", 2))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # all five admitted and generating
        text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
        if metric(text, "nbkit_batch_size") >= 4 and metric(text, "nbkit_generated_tokens_total") > 0:
            break
        time.sleep(0.2)
    else:  # SIGTERM before the requests are in flight would test an idle shutdown, not a drain
        pytest.fail(f"the requests were not in flight after 60 s: {results}\n{text[-2000:]}")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=40)
    exit_seconds = time.monotonic() - start
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client is still waiting after the server exited"
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert exit_seconds < 25, exit_seconds
    print(f"\nSIGTERM with 5 requests in flight: exited (code 0) after {exit_seconds:.1f} s")
    for name, (kind, status, body, seconds) in results.items():
        assert seconds < 60, name
        if kind == "stream":
            assert status == 200, (name, body)
            last = body[-1]
            # the end of a stream is its final token event or a clear error event, never a silent cut
            assert '"error_type":"cancelled"' in last or '"finish_reason"' in last, (name, last)
        else:
            assert (status == 200 and body["finish_reason"]) or (
                status == 503 and "stopping" in body["error"]), (name, status, body)
    assert results["short-plain"][1] == 200  # a short request finishes within the grace period
    assert any('"error_type":"cancelled"' in r[2][-1] for r in results.values() if r[0] == "stream")
    log = log_path.read_text()
    assert "POST /generate" in log  # access logs were on
    assert all(secret not in log for secret in SECRETS.values())
