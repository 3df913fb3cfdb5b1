"""The default engine on a CPU (llama.cpp, embedded GGUF) against llama.cpp's own peers, side by side in one run.

  python -m nbkit.bench.default_engine [--threads 1] [--prefill-tokens 64,256,500] [--tokens 64] [--concurrency 8]

Three tables, every peer on the same GGUF file with the same thread count:
  prefill (prompt tokens/s of one prompt per length, no cache reuse): the llama.cpp runner in exact and fast mode,
      fed in the engine's prefill chunks | `llama-server`'s own prompt timing | the torch runner and a plain
      HF forward of the same prompt on the same fp32 model, at 1 and at --threads torch threads;
  batch 1 (decode tokens/s): the default engine served over HTTP (/v1/completions) | llama-cpp-python's
      `Llama` in process;
  concurrency c (decode tokens/s, closed loop): the default engine over HTTP | `llama-server -np c`.
Peers alternate rep by rep (prefill) and wave by wave (decoding), so load from other processes hits them
alike; ratios are of totals. Prompts: held-out chat prompts (never trained or tuned on); the prefill prompt
is those prompts' text joined. Writes every figure to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import torch

from nbkit.bench.closed_loop import machine_name
from nbkit.bench.llamacpp import LlamaHighLevel, LlamaServer, closed_loop, interleaved, write_report
from nbkit.chat_format import user_prompt_ids
from nbkit.gguf.build import build_tools
from nbkit.gguf.files import embedded_gguf, gguf_tokenizer
from nbkit.medusa.prompts import distill_prompts
from nbkit.models import embedded_gguf_path

PREFILL_CHUNK = 256  # the engine's default prefill_budget: what one step feeds a prompt


def post_json(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


# ---- prefill peers: each returns the seconds one prompt's prefill took ------------------------------
class RunnerPrefill:
    """A runner's prefill of the whole prompt in the engine's chunks, then the slot freed (no reuse)."""

    def __init__(self, runner, chunk: int = PREFILL_CHUNK):
        self.runner, self.chunk = runner, chunk

    def seconds(self, ids: list[int]) -> float:
        slot = self.runner.alloc()
        t0 = time.perf_counter()
        for i in range(0, len(ids), self.chunk):
            self.runner.prefill({slot: ids[i: i + self.chunk]})
        self.runner.synchronize()
        dt = time.perf_counter() - t0
        self.runner.free(slot)
        return dt


class HFForward:
    """One plain forward of the prompt through the HF model (logits of every position, as HF computes them)."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def seconds(self, ids: list[int]) -> float:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        self.model(input_ids=x, use_cache=True)
        return time.perf_counter() - t0


class ServerPrefill:
    """llama-server's own prompt timing (timings.prompt_ms) of a request generating one token, cache off."""

    def __init__(self, server: LlamaServer):
        self.server = server

    def seconds(self, ids: list[int]) -> float:
        res = post_json(self.server.url + "/completion", {"prompt": ids, "n_predict": 1, "temperature": 0.0,
                                                            "cache_prompt": False})
        return res["timings"]["prompt_ms"] / 1000


def prefill_table(peers: dict, ids: list[int], reps: int, torch_threads: dict[str, int]) -> dict:
    """Prompt tokens/s per peer: the best and the median of `reps` alternating runs (after one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in peers}
    for rep in range(reps + 1):
        for name, peer in peers.items():
            torch.set_num_threads(torch_threads.get(name, torch.get_num_threads()))
            dt = peer.seconds(ids)
            if rep:
                times[name].append(dt)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"tokens_per_s_best": len(ids) / ts[0], "tokens_per_s_median": len(ids) / ts[len(ts) // 2],
                     "reps": len(ts)}
    return out


# ---- decoding peers over HTTP ----------------------------------------------------------------------
class NbkitHTTP:
    """The default engine behind nbkit's server; greedy /v1/completions on token ids."""

    def __init__(self, gguf: Path, threads: int, max_batch: int):
        from nbkit.server.launch import start_server

        self.handle = start_server(engine="llamacpp", model=str(gguf), port=0, max_batch=max_batch,
                                   n_threads=threads, start_timeout=120)
        self.engine = self.handle.engine
        self.complete([1, 2, 3], 4)  # warm-up

    def complete(self, ids: list[int], n: int) -> int:
        res = post_json(self.handle.url + "/v1/completions", {"model": self.engine.model_name, "prompt": ids,
                                                               "max_tokens": n, "temperature": 0.0})
        return res["usage"]["completion_tokens"]

    def wave(self, prompts, tokens, concurrency):
        return closed_loop(prompts, concurrency, lambda ids: self.complete(ids, tokens))

    def close(self):
        self.handle.stop()


class ServerTokens:
    """llama-server's closed loop, counted in generated tokens (its answers' lengths)."""

    def __init__(self, server: LlamaServer):
        self.server = server

    def wave(self, prompts, tokens, concurrency):
        return closed_loop(prompts, concurrency, lambda ids: len(self.server.complete(ids, tokens)))


def _ratio(r: dict, a: str, b: str) -> float:
    return r[a]["tokens_per_s"] / r[b]["tokens_per_s"]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nbkit.bench.default_engine")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for every peer; torch's second count")
    ap.add_argument("--prefill-tokens", default="64,256,500",
                    help="prompt lengths, comma-separated (llama-server -np c gives each slot 512 cells)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts-c1", type=int, default=8)
    ap.add_argument("--prompts-cn", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--skip-server", action="store_true", help="a dry run without llama-server (no binary built)")
    ap.add_argument("--server-bin", default=None, help="a llama-server binary (default: built from the vendored tree)")
    ap.add_argument("--skip-torch", action="store_true", help="leave out the torch runner and HF forward")
    ap.add_argument("--out", default="bench-out/default_engine.json")
    return ap.parse_args()


def _prefill_peers(gguf: Path, args, server: LlamaServer | None) -> tuple[dict, dict]:
    """{name: peer} and {name: torch threads} of the prefill table."""
    from nbkit.engine.llamacpp.runner import LlamaCppRunner

    peers = {"nbkit_llamacpp_exact": RunnerPrefill(LlamaCppRunner(gguf, max_slots=args.concurrency, exact=True,
                                                                  n_threads=args.threads)),
             "nbkit_llamacpp_fast": RunnerPrefill(LlamaCppRunner(gguf, max_slots=args.concurrency, exact=False,
                                                                 n_threads=args.threads))}
    if server is not None:
        peers["llama_server"] = ServerPrefill(server)
    threads: dict[str, int] = {}
    if not args.skip_torch:
        from nbkit.engine.loader import load_engine

        engine = load_engine("torch", heads="none", max_batch=args.concurrency, speculation="off", self_check=False)
        for t in sorted({1, args.threads}):
            peers[f"nbkit_torch_t{t}"] = RunnerPrefill(engine.runner)
            peers[f"hf_forward_t{t}"] = HFForward(engine.runner.model)
            threads[f"nbkit_torch_t{t}"] = threads[f"hf_forward_t{t}"] = t
    return peers, threads


def _prefill_ratios(table: dict) -> dict:
    def best(name: str) -> float:
        return table[name]["tokens_per_s_best"]

    out = {}
    if "llama_server" in table:
        out["exact_vs_llama_server"] = best("nbkit_llamacpp_exact") / best("llama_server")
        out["fast_vs_llama_server"] = best("nbkit_llamacpp_fast") / best("llama_server")
    out["exact_vs_fast"] = best("nbkit_llamacpp_exact") / best("nbkit_llamacpp_fast")
    for name in table:
        if name.startswith("nbkit_torch_t"):
            t = name.rsplit("_t", 1)[1]
            out[f"torch_vs_hf_t{t}"] = best(name) / best(f"hf_forward_t{t}")
    return out


def _prompts(args) -> tuple[list[list[int]], list[int]]:
    tokenizer = gguf_tokenizer(embedded_gguf_path())
    texts = distill_prompts()[1]
    chat = [user_prompt_ids(tokenizer, t) for t in texts[: max(args.prompts_c1, args.prompts_cn)]]
    joined = tokenizer.encode(" ".join(texts))[: max(_lengths(args))]
    return chat, joined


def run(args) -> dict:
    gguf = embedded_gguf()
    chat, long_ids = _prompts(args)
    binary = None if args.skip_server else Path(args.server_bin or build_tools(("llama-server",)) / "llama-server")
    server = LlamaServer(binary, gguf, args.concurrency, args.threads) if binary else None
    report = {"command": " ".join(["python -m nbkit.bench.default_engine", *sys.argv[1:]]), "gguf": gguf.name,
              "threads": args.threads, "machine": machine_name(), "load_before": os.getloadavg(),
              "prefill_chunk": PREFILL_CHUNK, "tokens": args.tokens, "prefill": {}}
    try:
        peers, threads = _prefill_peers(gguf, args, server)
        for n in _lengths(args):
            table = prefill_table(peers, long_ids[:n], args.prefill_reps, threads)
            report["prefill"][str(len(long_ids[:n]))] = table | {"ratios": _prefill_ratios(table)}
        for peer in peers.values():
            if isinstance(peer, RunnerPrefill) and hasattr(peer.runner, "close"):
                peer.runner.close()
        torch.set_num_threads(args.threads)
        report.update(_decoding(gguf, args, chat, server))
    finally:
        if server is not None:
            server.close()
    report["load_after"] = os.getloadavg()
    return report


def _lengths(args) -> list[int]:
    return [int(n) for n in str(args.prefill_tokens).split(",")]


def _decoding(gguf: Path, args, chat: list[list[int]], server: LlamaServer | None) -> dict:
    """Batch 1 (HTTP vs in-process Llama) and concurrency c (HTTP vs llama-server -np c), interleaved."""
    nbkit = NbkitHTTP(gguf, args.threads, args.concurrency)
    try:
        llama = LlamaHighLevel(gguf, args.threads)
        c1 = interleaved({"nbkit_http": nbkit, "llama_cpp_python": llama}, chat[: args.prompts_c1], args.tokens, 1, 1)
        llama.close()
        peers = {"nbkit_http": nbkit} | ({"llama_server": ServerTokens(server)} if server else {})
        c = args.concurrency
        cn = interleaved(peers, chat[: args.prompts_cn], args.tokens, c, c)
    finally:
        nbkit.close()
    out = {"c1": _strip(c1) | {"ratio_nbkit_http_vs_llama_cpp_python": _ratio(c1, "nbkit_http", "llama_cpp_python")},
           f"c{args.concurrency}": _strip(cn)}
    if server:
        out[f"c{args.concurrency}"]["ratio_nbkit_http_vs_llama_server"] = _ratio(cn, "nbkit_http", "llama_server")
    return out


def _strip(res: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k != "outputs"} for name, r in res.items()}


def print_report(report: dict) -> None:
    print(f"machine {report['machine']}, threads {report['threads']}, load {report['load_before']} -> "
          f"{report['load_after']}")
    for n, table in report["prefill"].items():
        print(f"prefill of {n} prompt tokens (tok/s, best | median):")
        for name, v in table.items():
            if name != "ratios":
                print(f"   {name:24s} {v['tokens_per_s_best']:8.1f} | {v['tokens_per_s_median']:8.1f}")
        print("   ratios", {k: round(x, 3) for k, x in table["ratios"].items()})
    for key in [k for k in report if k.startswith("c") and k[1:].isdigit()]:
        print(f"{key} decoding ({report['tokens']}-token greedy answers, tok/s):")
        for name, v in report[key].items():
            if isinstance(v, dict):
                print(f"   {name:24s} {v['tokens_per_s']:8.1f} ({v['tokens']} tokens, {v['seconds']:.1f} s)")
            else:
                print(f"   {name:24s} {v:8.3f}")


def main() -> None:
    args = _args()
    os.environ["NBKIT_LLAMA_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    report = run(args)
    print_report(report)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
