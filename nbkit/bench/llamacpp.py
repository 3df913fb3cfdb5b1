"""The llama.cpp engine against llama.cpp's own peers, side by side in one run, on the same GGUF file.

  python -m nbkit.bench.llamacpp [--threads 1] [--formats Q8_0[,Q4_1]] [--tokens 64]

Per format (Q8_0 = the engine's embedded default, a copy of the shipped Q4_1 file; Q4_1 = shipped):
  concurrency 1:  llama-cpp-python's high-level `Llama` | engine off (no heads) | engine with heads,
                  speculation off | engine with heads, adaptive
  concurrency 16: `llama-server -np 16` (built from the same vendored tree) on the same file, and on the
                  shipped Q4_1 file | the same three engines
plus: the --mode's greedy divergence (c=16 vs c=1, adaptive vs off, same prompts), and for
a requantized format its agreement with the shipped Q4_1 (greedy text, top-1 and KL per position).
Every peer uses the same thread count and the same chat prompts (held-out distillation prompts),
64-token greedy completions stopping at EOS. Writes bench-out/llamacpp.json (every figure, not the answers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from nbkit.chat_format import user_prompt_ids
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.runner import TreeInput
from nbkit.gguf.build import build_tools
from nbkit.gguf.files import embedded_gguf, gguf_tokenizer
from nbkit.medusa.heads import MedusaHeads, embedded_heads_dir
from nbkit.medusa.prompts import distill_prompts
from nbkit.medusa.trees import chain
from nbkit.models import embedded_gguf_path


def heads_arg():
    if embedded_heads_dir().exists():
        return "embedded", "trained (nbkit/medusa/data/smollm2-135m-heads)"
    # No trained heads yet: untrained heads (zero ResBlocks) propose the base model's own top-k.
    return MedusaHeads(576, 4), "untrained (zero ResBlocks: the base top-k)"


# ---- peers ---------------------------------------------------------------------------------------
# Each peer serves one "wave" of prompts at a given concurrency (closed loop: a client sends its next
# prompt when its previous answer is back) and returns (outputs, seconds). Waves of different peers are
# interleaved, so a burst of load from other processes on this shared CPU hits every peer alike.

class LlamaHighLevel:
    name = "llama-cpp-python Llama"

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.tokenizer = gguf_tokenizer(gguf)

    def wave(self, prompts, tokens, concurrency):
        assert concurrency == 1
        outs, t0 = [], time.perf_counter()
        for ids in prompts:
            res = self.llm.create_completion(ids, max_tokens=tokens, temperature=0.0)
            outs.append(res["usage"]["completion_tokens"])
        return outs, time.perf_counter() - t0

    def close(self):
        self.llm.close() if hasattr(self.llm, "close") else None


def closed_loop(prompts, concurrency, request) -> tuple[list, float]:
    work: queue.Queue = queue.Queue()
    for i, ids in enumerate(prompts):
        work.put((i, ids))
    outs: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client():
        while True:
            try:
                i, ids = work.get_nowait()
            except queue.Empty:
                return
            try:
                outs[i] = request(ids)
            except BaseException as err:  # reported after the wave
                errors.append(err)
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [outs[i] for i in range(len(prompts))], time.perf_counter() - t0


class EnginePeer:
    def __init__(self, engine, name):
        self.engine, self.name = engine, name
        engine.start()
        engine.generate([1, 2, 3], SamplingParams(max_tokens=4))  # warm-up

    def wave(self, prompts, tokens, concurrency):
        return closed_loop(prompts, concurrency,
                           lambda ids: self.engine.submit(ids, SamplingParams(max_tokens=tokens)).result().token_ids)

    def close(self):
        self.engine.stop()
        self.engine.runner.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    name = "llama-server"

    def __init__(self, server: Path, gguf: Path, slots: int, threads: int):
        port = free_port()
        self.cmd = [str(server), "-m", str(gguf), "-np", str(slots), "-c", str(512 * slots), "-t", str(threads),
                    "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("llama-server did not start: " + " ".join(self.cmd))
            time.sleep(0.5)
        self.complete([1, 2, 3], 4)  # warm-up

    def complete(self, ids: list[int], n: int) -> list[int]:
        body = json.dumps({"prompt": ids, "n_predict": n, "temperature": 0.0, "cache_prompt": False,
                           "return_tokens": True}).encode()
        req = urllib.request.Request(self.url + "/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["tokens"]

    def wave(self, prompts, tokens, concurrency):
        return closed_loop(prompts, concurrency, lambda ids: self.complete(ids, tokens))

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def interleaved(peers: dict, prompts: list[list[int]], tokens: int, concurrency: int, wave_size: int) -> dict:
    """Serve `prompts` in waves; every wave is served by every peer, in rotating order."""
    res = {name: {"tokens": 0, "seconds": 0.0, "outputs": [], "wave_tokens_per_s": []} for name in peers}
    names = list(peers)
    before = {n: dict(p.engine.speculation.choices) for n, p in peers.items() if isinstance(p, EnginePeer)}
    for w, start in enumerate(range(0, len(prompts), wave_size)):
        wave = prompts[start: start + wave_size]
        for name in names[w % len(names):] + names[: w % len(names)]:
            outs, seconds = peers[name].wave(wave, tokens, concurrency)
            produced = sum(o if isinstance(o, int) else len(o) for o in outs)
            res[name]["seconds"] += seconds
            res[name]["tokens"] += produced
            res[name]["wave_tokens_per_s"].append(produced / seconds)
            res[name]["outputs"] += outs
    for name, r in res.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        if isinstance(peers[name], EnginePeer):
            after = peers[name].engine.speculation.choices
            r["tree_choices"] = {k: v - before[name].get(k, 0) for k, v in after.items() if v > before[name].get(k, 0)}
    return res


def without_outputs(report: dict) -> dict:
    """`report` without any result's `outputs` (every answer's token ids): the match rates are computed from
    them in memory; kept in the file they made it tens of thousands of lines."""
    return {k: without_outputs(v) if isinstance(v, dict) else v for k, v in report.items() if k != "outputs"}


def write_report(report: dict, out: str | Path) -> None:
    """Write the report's settings, tok/s, ratios, tree choices and match rates (not the outputs) to `out`."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(without_outputs(report), indent=1))
    print(f"wrote {path}")


# ---- quality of a requantized copy ---------------------------------------------------------------
def logits_along(gguf: Path, ids: list[int], threads: int) -> torch.Tensor:
    from nbkit.engine.llamacpp.runner import LlamaCppRunner

    runner = LlamaCppRunner(gguf, max_slots=1, n_threads=threads, hidden=False, exact=False)
    slot = runner.alloc()
    runner.prefill({slot: ids[:1]})
    logits, _ = runner.verify([TreeInput(slot, chain(len(ids) - 2), ids[1:])])[slot]
    runner.close()
    return logits


def agreement(reference: Path, other: Path, texts: list[list[int]], threads: int) -> dict:
    """Per position along real answers: top-1 agreement and KL(reference || other)."""
    top1, kls = [], []
    for ids in texts:
        a, b = logits_along(reference, ids, threads), logits_along(other, ids, threads)
        top1.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
        kls.append(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item())
    return {"top1_agreement": sum(top1) / len(top1), "mean_kl": sum(kls) / len(kls)}


def same(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nbkit.bench.llamacpp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", default="Q8_0", help="Q8_0 is the engine's embedded default")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts-c1", type=int, default=12)
    ap.add_argument("--prompts-c16", type=int, default=32)
    ap.add_argument("--out", default="bench-out/llamacpp.json")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--skip-server", action="store_true", help="a dry run without llama-server")
    ap.add_argument("--mode", choices=("exact", "fast"), default="exact", help="the llama.cpp engine's mode")
    return ap.parse_args()


def _engines(gguf: Path, heads: str, c: int, threads: int, exact: bool) -> dict:
    off = load_engine("llamacpp", gguf, heads="none", max_batch=c, speculation="off", n_threads=threads,
                      exact=exact)
    # The same engine as `adaptive` with speculation off: heads loaded, hidden states on, probes run.
    off_h = load_engine("llamacpp", gguf, heads=heads, max_batch=c, speculation="off", n_threads=threads,
                        exact=exact)
    ada = load_engine("llamacpp", gguf, heads=heads, max_batch=c, speculation="adaptive", n_threads=threads,
                      exact=exact)
    ada.prepare()  # calibration is not part of the timed runs
    return {"engine_off": EnginePeer(off, "engine off"), "engine_off_heads": EnginePeer(off_h, "off, heads"),
            "engine_adaptive": EnginePeer(ada, "engine adaptive")}


def _run_format(gguf: Path, args, p1, p16, server: Path | None, heads: str) -> dict:
    """c=1 against llama-cpp-python's Llama, c=16 against llama-server, every engine interleaved."""
    c = args.concurrency
    engines = _engines(gguf, heads, c, args.threads, args.mode == "exact")
    llama = LlamaHighLevel(gguf, args.threads)
    c1 = interleaved({"llama_high_level": llama, **engines}, p1, args.tokens, 1, 1)
    llama.close()
    peers16 = dict(engines)
    if server:
        peers16 = {"llama_server": LlamaServer(server, gguf, c, args.threads), **engines}
        if gguf != embedded_gguf_path():  # the anchor: llama-server on the shipped Q4_1 file
            peers16["llama_server_q4_1"] = LlamaServer(server, embedded_gguf_path(), c, args.threads)
    c16 = interleaved(peers16, p16, args.tokens, c, c)
    for peer in peers16.values():
        if isinstance(peer, LlamaServer):
            peer.close()
    if not server:
        c16["llama_server"] = {"tokens": 0, "seconds": 1.0, "tokens_per_s": float("nan"), "outputs": []}
    for e in engines.values():
        e.close()
    return {f"c1_{k}": v for k, v in c1.items()} | {f"c16_{k}": v for k, v in c16.items()}


def _divergence(r: dict) -> dict:
    solo = r["c1_engine_off"]["outputs"]
    return {
        "c16_off_vs_c1_off": 1 - same(r["c16_engine_off"]["outputs"][: len(solo)], solo),
        "c1_adaptive_vs_c1_off": 1 - same(r["c1_engine_adaptive"]["outputs"], solo),
        "c16_adaptive_vs_c1_off": 1 - same(r["c16_engine_adaptive"]["outputs"][: len(solo)], solo),
        "prompts": len(solo),
    }


def _ratios(r: dict) -> dict:
    def tps(name: str) -> float:
        return r[name]["tokens_per_s"]

    ratios = {
        "c1_off_vs_llama": tps("c1_engine_off") / tps("c1_llama_high_level"),
        "c16_off_vs_server": tps("c16_engine_off") / tps("c16_llama_server"),
        "c16_adaptive_vs_server": tps("c16_engine_adaptive") / tps("c16_llama_server"),
        "c1_adaptive_vs_off": tps("c1_engine_adaptive") / tps("c1_engine_off"),
        "c16_adaptive_vs_off": tps("c16_engine_adaptive") / tps("c16_engine_off"),
        "c1_adaptive_vs_off_same_engine": tps("c1_engine_adaptive") / tps("c1_engine_off_heads"),
        "c16_adaptive_vs_off_same_engine": tps("c16_engine_adaptive") / tps("c16_engine_off_heads"),
    }
    if "c16_llama_server_q4_1" in r:
        ratios["c16_off_vs_server_on_shipped_q4_1"] = tps("c16_engine_off") / tps("c16_llama_server_q4_1")
        ratios["c16_adaptive_vs_server_on_shipped_q4_1"] = tps("c16_engine_adaptive") / tps("c16_llama_server_q4_1")
    return ratios


def _print_format(r: dict) -> None:
    for name, v in r.items():
        if isinstance(v, dict) and "tokens_per_s" in v:
            extra = f" trees {v['tree_choices']}" if v.get("tree_choices") else ""
            print(f"   {name:24s} {v['tokens_per_s']:7.1f} tok/s ({v['tokens']} tokens, "
                  f"{v['seconds']:.1f} s){extra}", flush=True)
    print("   ratios", {k: round(x, 3) for k, x in r["ratios"].items()}, flush=True)
    print("   divergence", r["divergence"], flush=True)
    if "quality_vs_q4_1" in r:
        print("   quality vs Q4_1", r["quality_vs_q4_1"], flush=True)


def main() -> None:
    args = _args()
    os.environ["NBKIT_LLAMA_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    tokenizer = gguf_tokenizer(embedded_gguf_path())
    texts = distill_prompts()[1][: max(args.prompts_c1, args.prompts_c16)]
    prompts = [user_prompt_ids(tokenizer, t) for t in texts]
    p1, p16 = prompts[: args.prompts_c1], prompts[: args.prompts_c16]
    server = None if args.skip_server else build_tools(("llama-server",)) / "llama-server"
    heads, heads_note = heads_arg()
    report = {"command": " ".join(sys.argv), "threads": args.threads, "tokens": args.tokens, "heads": heads_note,
              "machine": platform.processor() or platform.machine(), "load_before": os.getloadavg(),
              "prompt_tokens_mean": sum(map(len, p16)) / len(p16), "formats": {}, "mode": args.mode}
    for fmt in args.formats.split(","):
        gguf = embedded_gguf(fmt)
        print(f"== {fmt}: {gguf}", flush=True)
        r = _run_format(gguf, args, p1, p16, server, heads)
        r["divergence"], r["ratios"] = _divergence(r), _ratios(r)
        if gguf != embedded_gguf_path():
            solo = r["c1_engine_off"]["outputs"]
            answers = [p + o for p, o in zip(p1[:4], solo[:4])]
            r["quality_vs_q4_1"] = agreement(embedded_gguf_path(), gguf, answers, args.threads)
            if "Q4_1" in report["formats"]:
                q4 = report["formats"]["Q4_1"]["c1_engine_off"]["outputs"]
                r["quality_vs_q4_1"]["greedy_text_equal_c1"] = same(solo, q4)
        _print_format(r)
        report["formats"][fmt.upper()] = r
    report["load_after"] = os.getloadavg()
    write_report(report, args.out)


if __name__ == "__main__":
    main()
