"""`00_run_all` as Colab runs it, with its default parameters, on the vicuna miniature, twice per plan.

What makes the kernel Colab's (see fake_colab/):
- `google.colab` is importable and COLAB_RELEASE_TAG is set, so nbkit's in_colab() is true; the secrets
  (HF token, ngrok token, API key) exist only in the fake `userdata`; `output.eval_js` answers a proxy URL;
- a fresh directory plays /content: the kernel starts there, and `nbkit` is not importable (the venv's
  editable install is hidden) until the first cell clones the repository from $NBKIT_GIT (a clone of this
  repository's committed HEAD) and puts the checkout on sys.path;
- $NBKIT_GPU makes the plan for a T4 (llama.cpp, Q8_0 GGUF converted from the .bin shards) or an A100 (torch);
  everything runs on this CPU; `lmsys/vicuna-7b-v1.3` and `FasterDecoding/medusa-vicuna-7b-v1.3` come from
  the miniature through $NBKIT_HUB_MIRROR.

Each plan runs all cells, then the kernel is restarted and Run all runs again in the same directory: it
must pass again (after a restart /content/nbkit is found as an empty namespace package) and reuse what
the first run downloaded, built and converted.

Medusa must be seen accepted through the notebook on both engines, so each plan serves the published tree
in one of its runs. Whether the adaptive default speculates on this CPU is the policy's call on this
machine's timings (the miniature's heads cost ~30% of its step: a marginal trade that a noisy machine tips
either way), so where the A100 plan runs its adaptive default the check is that the answers are plain
greedy and the server says what it runs; its second run is a user who sets SPECULATION to the published
tree and runs all again.

Parameters other than the defaults: TUNNEL is "colab" (Colab's proxy, faked here), since ngrok cannot be
reached from CI (the ngrok token is still a secret); PORT is a free one. On the T4, ENGINE and QUANTIZATION
are set to what "auto" chooses there for the real vicuna-7b (asserted below): the miniature itself is so
small that a plan sized from its own config.json would serve it in f16 with torch on any GPU.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"
BASE_ID, HEADS_ID = "lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3"
SECRETS = {"HF_TOKEN": "hf_colabfake_91c3e2b7aa", "NGROK_AUTHTOKEN": "2fakeNgrokTok_5e8d0c41b9",
           "NBKIT_API_KEY": "nbk-colab-fake-key-7d1f0a"}
GPUS = {"t4": "Tesla T4, 15360, 15095, 7.5", "a100": "NVIDIA A100-SXM4-40GB, 40960, 40339, 8.0"}
ENGINES = {"t4": "llamacpp", "a100": "torch"}
PARAMS = {"t4": {"NBKIT_ENGINE": "llamacpp", "NBKIT_QUANTIZATION": "q8_0"}, "a100": {}}
# SPECULATION in the first and the second Run all of each plan (None: the notebook's default, adaptive).
# The T4 plan fixes the published tree in both: this run must show Medusa accepted on GGUF every time.
TREE = "mc_sim_7b_63"
SPECULATION = {"t4": (TREE, TREE), "a100": (None, TREE)}
PROMPT = "Once upon a time there was"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MAX_TOKENS = 32
# Run after the notebook's own cells, in the same kernel: where its server listens and which nbkit it runs.
AFTER = "import nbkit\nprint(public.local_url, nbkit.__file__)"


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> str:
    """A clone of this repository's committed HEAD, as the remote that $NBKIT_GIT names."""
    bare = tmp_path_factory.mktemp("remote") / "nbkit.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(bare)], check=True)
    return f"file://{bare}"


@pytest.fixture(scope="module")
def llama_cpp_source() -> Path:
    """The pinned llama.cpp tree (converter included), from the shared cache (downloaded once if missing)."""
    from nbkit.gguf import build

    build.source_dir()
    return build.root().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kernel_env(home: Path, mirror: Path, repository: str, plan: str, port: int,
                speculation: str | None = None) -> dict[str, str]:
    """The kernel's environment: this machine's, minus nbkit's own settings and secrets, plus Colab's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NBKIT_", "HF_", "HUGGING_FACE", "PYTEST_", "JPY_")) and k not in SECRETS
           and k not in ("PYTHONPATH", "NGROK_AUTHTOKEN")}
    (home / "secrets.json").write_text(json.dumps(SECRETS))
    env.update({
        "PYTHONPATH": str(FAKE_COLAB), "COLAB_RELEASE_TAG": "fake-colab-ci",
        "FAKE_COLAB_SECRETS": str(home / "secrets.json"), "FAKE_COLAB_LOG": str(home / "colab.log"),
        "NBKIT_GIT": repository, "NBKIT_CHECKOUT": str(home / "content" / "nbkit"),
        "NBKIT_CACHE_DIR": str(home / "cache"), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
        "NBKIT_HUB_MIRROR": str(mirror), "NBKIT_GPU": GPUS[plan], "NBKIT_TUNNEL": "colab", "NBKIT_PORT": str(port),
        "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", **PARAMS[plan],
    })
    if speculation is not None:
        env["NBKIT_SPECULATION"] = speculation
    return env


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts += [data.get("text/plain", ""), data.get("text/html", "")]
        if out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])))
    return "".join(parts)


def _cell(nb, code: str):
    return next(c for c in nb.cells if c.cell_type == "code" and code in c.source)


def _snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every downloaded or converted file: a re-run that reuses them leaves both alone."""
    files = [p for sub in ("hub", "gguf") for p in (cache / sub).rglob("*") if p.is_file()]
    return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


def run_all(home: Path, env: dict[str, str], check=None, name: str = "00_run_all") -> nbformat.NotebookNode:
    """Run all cells of a notebook in a fresh kernel started in home/content, then `check(local_url)` while
    the kernel (and its server) still runs; save the notebook and return it."""
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    content = home / "content"
    content.mkdir(exist_ok=True)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(content)}})
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        cell = nbformat.v4.new_code_cell(AFTER if check else "import nbkit\nprint('-', nbkit.__file__)")
        nb.cells.append(cell)
        client.execute_cell(cell, len(nb.cells) - 1)
        local_url, nbkit_file = _text(cell).split()
        assert nbkit_file == str(content / "nbkit" / "nbkit" / "__init__.py"), "the kernel runs the clone"
        if check:
            check(local_url)
    saved = home / f"{name}.{len(list(home.glob('*.ipynb')))}.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text()
    for secret, value in SECRETS.items():
        assert value not in text, f"the secret {secret} is in the saved notebook"
    return nb


# --- the references, computed here from the mirror's files ----------------------------------------------
def _tokenizer(mirror: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mirror / BASE_ID)


def torch_greedy(mirror: Path, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers (fp32), one token at a time, stopping at </s>."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mirror / BASE_ID, dtype=torch.float32).eval()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == model.config.eos_token_id:
                break
    return out


def llamacpp_greedy(gguf: Path, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding of the GGUF with llama.cpp's own bindings, stopping at </s>."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=1, logits_all=True, verbose=False)  # keeps scores
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids, "the GGUF tokenizes as the HF tokenizer does"
    out: list[int] = []
    llm.eval(ids)
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] == llm.token_eos():
            break
        llm.eval([out[-1]])
    llm.close()
    return out


def reference_gguf(mirror: Path, home: Path) -> Path:
    """The miniature converted to Q8_0 here, with the pinned converter directly (not through nbkit)."""
    from nbkit.gguf.build import vendor_dir

    out = home / "reference.Q8_0.gguf"
    subprocess.run([sys.executable, str(vendor_dir() / "convert_hf_to_gguf.py"), str(mirror / BASE_ID),
                    "--outtype", "q8_0", "--outfile", str(out)], check=True, capture_output=True)
    return out


# --- what is checked over HTTP while the notebook's server runs -----------------------------------------
def reference(plan: str, mirror: Path, home: Path) -> tuple[list[int], list[int]]:
    """(ids of <s> + PROMPT, plain greedy continuation) with the plan's engine kind."""
    tok = _tokenizer(mirror)
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    if ENGINES[plan] == "torch":
        return ids, torch_greedy(mirror, ids, MAX_TOKENS)
    return ids, llamacpp_greedy(reference_gguf(mirror, home), ids, MAX_TOKENS)


def check_server(url: str, mirror: Path, ids: list[int], want: list[int], speculation: str | None) -> dict:
    """speculation: the notebook's SPECULATION (None: its default, adaptive)."""
    tok = _tokenizer(mirror)
    expected = tok.decode(want, skip_special_tokens=True)
    headers = {"Authorization": f"Bearer {SECRETS['NBKIT_API_KEY']}"}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        assert httpx.get(f"{url}/v1/models").status_code == 401, "the key from the Colab secret is required"
        info = http.get("/info").json()
        assert (info["heads"], info["speculation"]) == (5, "fixed" if speculation else "adaptive"), info
        answers = {}
        # "default": the notebook's SPECULATION (see SPECULATION above); clients may not force a tree on this server.
        for name, extra in {"default": {}, "plain": {"speculate": False}}.items():
            r = http.post("/generate", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, **extra})
            assert r.status_code == 200, r.text
            answers[name] = r.json()
        for name, got in answers.items():
            assert got["response"] == expected, f"/generate ({name}) differs from plain greedy of <s> + prompt"
            assert (got["prompt_tokens"], got["completion_tokens"]) == (len(ids), len(want)), name
        if speculation:
            assert answers["default"]["steps"] < answers["plain"]["steps"], "Medusa's tree was accepted at least once"
        else:  # the adaptive policy may run no tree here (see the module's docstring), never a losing step count
            assert answers["default"]["steps"] <= answers["plain"]["steps"]

        # /v1/chat/completions renders FastChat's vicuna_v1.1 conversation: the same greedy answer as a
        # completion of the rendered text, token for token.
        question = "What does a cat like to do?"
        rendered = tok(f"{SYSTEM} USER: {question} ASSISTANT:")["input_ids"]
        chat = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, "temperature": 0})
        assert chat.status_code == 200, chat.text
        completion = http.post("/v1/completions", json={"prompt": rendered, "max_tokens": MAX_TOKENS,
                                                        "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert chat.json()["usage"]["prompt_tokens"] == len(rendered)
        assert chat.json()["choices"][0]["message"]["content"] == completion.json()["choices"][0]["text"]
    # What must not change across a restart (steps of adaptive speculation may: they follow timings).
    return {name: (got["response"], got["prompt_tokens"], got["completion_tokens"]) for name, got in answers.items()}


def _colab_calls(home: Path) -> list[dict]:
    log = home / "colab.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_the_t4_parameters_are_what_auto_chooses_for_vicuna_7b():
    from nbkit.notebook.env import Environment, resolve_plan, simulated_gpus

    for plan, gpu in GPUS.items():
        facts = Environment(colab=True, python="3.12", torch=None, cuda=None, gpus=simulated_gpus(gpu))
        chosen = resolve_plan("auto", "auto", env=facts)  # vicuna-7b's sizes: no model given
        assert chosen.engine == ENGINES[plan]
        if PARAMS[plan]:
            assert (chosen.engine, chosen.quantization) == (PARAMS[plan]["NBKIT_ENGINE"],
                                                            PARAMS[plan]["NBKIT_QUANTIZATION"])


@pytest.fixture
def mirror(vicuna_mirror) -> Path:
    return Path(vicuna_mirror)


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["t4", "a100"])
def test_run_all_as_colab_twice(plan, mirror, repository, llama_cpp_source, tmp_path):
    home = tmp_path
    (home / "cache").mkdir()
    # The llama.cpp build is already done on this machine (bindings in the venv, the pinned source in the
    # shared cache): the notebook's build step must find and reuse it, not compile for minutes.
    (home / "cache" / "llama-cpp").symlink_to(llama_cpp_source, target_is_directory=True)
    port = _free_port()
    env = _kernel_env(home, mirror, repository, plan, port, SPECULATION[plan][0])
    ids, want = reference(plan, mirror, home)
    seen: list[dict] = []

    first = run_all(home, env, lambda url: seen.append(check_server(url, mirror, ids, want, SPECULATION[plan][0])))
    files = _snapshot(home / "cache")
    assert any(f.endswith("pytorch_model-00002-of-00002.bin") for f in files)
    assert any(f.endswith("medusa_lm_head.pt") for f in files)
    if plan == "t4":
        ggufs = [f for f in files if f.endswith(".gguf")]
        assert len(ggufs) == 1 and ggufs[0].lower().endswith("vicuna-7b-v1.3.q8_0.gguf"), files

    # Runtime > Restart session, then Run all again in the same /content (on the A100, with the published tree).
    env = _kernel_env(home, mirror, repository, plan, port, SPECULATION[plan][1])
    second = run_all(home, env, lambda url: seen.append(check_server(url, mirror, ids, want, SPECULATION[plan][1])))
    assert _snapshot(home / "cache") == files, "the second Run all downloaded or converted again"
    assert seen[0] == seen[1]

    for nb in (first, second):
        shown = {name: _text(_cell(nb, code)) for name, code in {
            "env": "env = show_summary()", "plan": "plan = ", "build": "ensure_engine(plan",
            "login": "login()", "ngrok": "ngrok_status()", "prepare": "prepared = prepare",
            "serve": "public = serve", "answer": "answer = public.generate", "chat": "panel.send("}.items()}
        assert "Google Colab" in shown["env"] and "simulated by $NBKIT_GPU" in shown["env"]
        assert f"engine={ENGINES[plan]!r}" in shown["plan"]
        assert "token found (Colab secret HF_TOKEN)" in shown["login"]
        assert "token found (Colab secret NGROK_AUTHTOKEN)" in shown["ngrok"]
        assert "5 heads (config.json says 2; the weights win)" in shown["prepare"]
        assert "only in your browser" in shown["serve"] and "curl http" not in shown["serve"]
        assert 'data-fake-colab="serve_kernel_port_as_iframe"' in shown["serve"], "the chat page is shown inline"
        assert int(re.search(r"completion_tokens=(\d+)", shown["answer"])[1]) > 0
        assert re.search(r"\[\d+ tokens · [\d.]+ tok/s · [\d.]+ tokens/step", shown["chat"]), shown["chat"]
        if plan == "t4":
            assert "already installed" in shown["build"], shown["build"]
    if plan == "t4":
        assert "is up to date" in _text(_cell(second, "prepared = prepare")), "the GGUF is converted once"
    calls = _colab_calls(home)
    proxy = [c for c in calls if c["call"] == "eval_js"]
    assert len(proxy) == 2 and all(c["timeout_sec"] for c in proxy), "eval_js is always given a timeout"
    assert [c["call"] for c in calls].count("serve_kernel_port_as_iframe") == 2


@pytest.mark.slow
def test_06_benchmark_as_colab(mirror, repository, tmp_path):
    """`python -m nbkit bench` runs in a child process, which does not see the kernel's sys.path (in Colab the
    only place nbkit is): the child must still import the clone. The smallest run, plumbing only."""
    (tmp_path / "cache").mkdir()
    env = _kernel_env(tmp_path, mirror, repository, "a100", _free_port())
    env["NBKIT_BENCH_ARGS"] = ("--concurrency 1,2 --speculation off --max-tokens 8 --requests-per-client 1 "
                               "--min-requests 2 --no-mixed")
    nb = run_all(tmp_path, env, name="06_benchmark")
    ran = _cell(nb, "run_benchmark(")
    assert "bench.json" in _text(ran) and any("image/png" in o.get("data", {}) for o in ran.outputs)
    assert json.loads((tmp_path / "content" / "bench" / "bench.json").read_text())
