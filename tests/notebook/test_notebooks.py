"""The notebooks, executed headless top to bottom the way Colab's "Run all" does, on the embedded model.

Parameters come from the environment (NBKIT_<NAME>), exactly as a user or papermill would override
them: the embedded SmolLM2 or a local folder, torch on CPU, no tunnel. Tokens and an API key are set to
known values, and the saved notebooks are searched for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
SECRETS = {"NBKIT_API_KEY": "nbk-test-key-5f3a9c0d", "HF_TOKEN": "hf_testtoken_8d2e71aa",
           "NGROK_AUTHTOKEN": "ngrok_test_4b6c0e99"}
EXPECTED = ["00_run_all", "01_install_and_build_llama_cpp", "02_login_hugging_face", "03_download_and_convert",
            "04_serve_medusa", "05_chat", "06_benchmark", "07_scale_out"]


def read(name: str):
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


# --- what is committed ------------------------------------------------------------------------------
def test_all_notebooks_are_there():
    assert NAMES == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_shape(name):
    nb = read(name)
    nbformat.validate(nb)
    intro = nb.cells[0]
    assert intro.cell_type == "markdown"
    assert "colab.research.google.com/github/" in intro.source and f"notebooks/{name}.ipynb" in intro.source
    assert "colab-badge.svg" in intro.source and re.search(r"^# ", intro.source, re.MULTILINE)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
    # Every cell is valid IPython (the Colab bootstrap's shell line included, which CI never runs).
    from IPython.core.inputtransformer2 import TransformerManager

    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(TransformerManager().transform_cell(cell.source), f"{name}:{cell.id}", "exec",
                    flags=0x2000)  # PyCF_ALLOW_TOP_LEVEL_AWAIT
    # Thin cells: apart from the Colab bootstrap and the parameters, each is a call or two.
    body = [c for c in nb.cells if c.cell_type == "code" and c is not tagged[0] and "NBKIT_GIT" not in c.source]
    assert all(len(c.source.strip().splitlines()) <= 5 for c in body)
    # Markdown renders: section cells are headings ("## ..."), not text that starts with "md ".
    for cell in nb.cells[1:]:
        if cell.cell_type == "markdown":
            assert cell.source.startswith("## "), f"{name}: a markdown cell is not a heading: {cell.source[:40]!r}"
    # The Colab bootstrap: the repository is a form field, and $NBKIT_GIT overrides it.
    boot = [c for c in nb.cells if c.cell_type == "code" and "NBKIT_GIT" in c.source]
    assert len(boot) == 1 and nb.cells.index(boot[0]) == 1
    assert re.search(r'^NBKIT_GIT = "https://[^"]+"  #@param \{type:"string"\}$', boot[0].source, re.MULTILINE)


# --- executed -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A local model folder (the embedded one) and Medusa heads for it, as a user's own files would be.

    The heads are untrained (so tests say nothing about speed); SPECULATION is a fixed chain because
    "adaptive" first measures the forward cost of up to 1024 tokens, minutes on a busy 2-core CPU."""
    import torch

    from nbkit.medusa.heads import MedusaHeads, save_heads
    from nbkit.models import embedded_hf_dir

    model_dir = embedded_hf_dir()
    torch.manual_seed(0)
    heads = MedusaHeads(json.loads((model_dir / "config.json").read_text())["hidden_size"], 3)
    heads_dir = save_heads(heads, tmp_path_factory.mktemp("heads"))
    return {"model": str(model_dir), "heads": str(heads_dir)}


def run(name: str, tmp_path, monkeypatch, extra_cells=(), inject=None, **params):
    """Execute a notebook in a fresh kernel (plus `extra_cells` in the same kernel); save it; return it.

    `inject` overrides parameters the way papermill does: a cell right after the `parameters` cell."""
    from nbclient import NotebookClient

    settings = {"model": "embedded", "heads": "", "engine": "torch", "quantization": "none", "tunnel": "none",
                "port": "0", "speculation": "chain-2", **params}
    for key, value in settings.items():
        monkeypatch.setenv(f"NBKIT_{key.upper()}", value)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    nb = read(name)
    if inject:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
        source = "\n".join(f"{k} = {v!r}" for k, v in inject.items())
        nb.cells.insert(at, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        for source in extra_cells:
            cell = nbformat.v4.new_code_cell(source)
            nb.cells.append(cell)
            client.execute_cell(cell, len(nb.cells) - 1)
    out = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, out)
    saved = out.read_text()
    for key, value in SECRETS.items():
        assert value not in saved, f"{key} leaked into the saved outputs of {name}"
    return nb


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def cell_with(nb, code: str):
    return next(c for c in nb.cells if c.cell_type == "code" and code in c.source)


@pytest.mark.slow
def test_01_install_and_build(tmp_path, monkeypatch):
    # Parameters injected papermill-style win over the environment's.
    nb = run("01_install_and_build_llama_cpp", tmp_path, monkeypatch, engine="not-this-one",
             inject={"ENGINE": "torch"})
    assert "nbkit requirements: all present" in text_of(cell_with(nb, "ensure_requirements"))
    assert "engine torch: nothing to build" in text_of(cell_with(nb, "ensure_engine(plan"))
    assert "runtime :" in text_of(cell_with(nb, "env = show_summary()"))


@pytest.mark.slow
def test_02_login(tmp_path, monkeypatch):
    nb = run("02_login_hugging_face", tmp_path, monkeypatch)
    assert "token found (environment variable HF_TOKEN)" in text_of(cell_with(nb, "login()"))
    assert "ngrok: token found (environment variable NGROK_AUTHTOKEN)" in text_of(cell_with(nb, "ngrok_status()"))


@pytest.mark.slow
def test_03_download_and_convert(tmp_path, monkeypatch, local_files):
    nb = run("03_download_and_convert", tmp_path, monkeypatch, **local_files)
    shown = text_of(cell_with(nb, "prepared = prepare"))
    assert f"model  : {local_files['model']}" in shown and "3 heads" in shown


@pytest.mark.slow
def test_04_serve_answers_generate_and_rerun_replaces_the_server(tmp_path, monkeypatch, local_files):
    rerun = [
        "first = public.server\npublic = serve(prepared, TUNNEL, PORT, API_KEY, speculation=SPECULATION)",
        'answer = public.generate("Say hello.", max_tokens=8)',
        ("import threading\nservers = [t for t in threading.enumerate() if t.name == 'nbkit-server']\n"
         "print(len(servers), first.running)"),
    ]
    nb = run("04_serve_medusa", tmp_path, monkeypatch, extra_cells=rerun, **local_files)
    answered = text_of(cell_with(nb, "answer = public.generate(\"What is"))
    tokens = int(re.search(r"completion_tokens=(\d+)", answered)[1])
    assert tokens > 0 and "finish_reason=" in answered
    assert "Local URL (none): http://127.0.0.1:" in text_of(cell_with(nb, "public = serve"))
    assert "completion_tokens=" in text_of(nb.cells[-2])
    assert text_of(nb.cells[-1]).split() == ["1", "False"]  # one server: the first was stopped, not leaked


@pytest.mark.slow
def test_05_chat(tmp_path, monkeypatch, local_files):
    # After the notebook, what the buttons do in a real kernel: Send streams as a task on the kernel's
    # event loop while other cells run; Stop, clicked meanwhile, ends the reply.
    clicks = [
        ('panel.max_tokens.value = 400\npanel.prompt.value = "Count from 1 to 200."\npanel.send_button.click()\n'
        "print(panel.busy, panel.send_button.disabled)"),
        ("import asyncio\nwhile not panel.replies[-1].chunks:\n    await asyncio.sleep(0.05)\n"
        "panel.stop_button.click()\nreply = await panel._task\n"
        "print(reply.finish_reason, 0 < reply.chunks < 400, panel.busy, panel.stop_button.disabled)"),
    ]
    nb = run("05_chat", tmp_path, monkeypatch, extra_cells=clicks, **local_files)
    reply = text_of(cell_with(nb, "panel.send("))
    assert re.search(r"\[\d+ tokens · [\d.]+ tok/s · [\d.]+ tokens/step", reply), reply
    panel = cell_with(nb, "panel = chat_panel")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in panel.outputs)
    assert text_of(nb.cells[-2]).split() == ["True", "True"]
    assert text_of(nb.cells[-1]).split() == ["stopped", "True", "False", "True"]


@pytest.mark.slow
def test_00_run_all(tmp_path, monkeypatch, local_files):
    nb = run("00_run_all", tmp_path, monkeypatch, **local_files)
    answered = text_of(cell_with(nb, "answer = public.generate"))
    assert int(re.search(r"completion_tokens=(\d+)", answered)[1]) > 0
    assert "tok/s" in text_of(cell_with(nb, "panel.send("))


@pytest.mark.slow
def test_06_benchmark(tmp_path, monkeypatch):
    # Plumbing only (the benchmark itself is tested with its module): the smallest run, no heads.
    nb = run("06_benchmark", tmp_path, monkeypatch, heads="none", bench_args=(
        "--concurrency 1,2 --speculation off --max-tokens 8 --requests-per-client 1 --min-requests 2 "
        "--no-mixed"))
    images = [o for o in cell_with(nb, "run_benchmark(").outputs if "image/png" in o.get("data", {})]
    assert images, "the benchmark plots are shown inline"
    assert "bench.json" in text_of(cell_with(nb, "run_benchmark("))


@pytest.mark.slow
def test_07_scale_out(tmp_path, monkeypatch):
    # The embedded model and its shipped heads (shared lm_head + proposal vocabulary), exported for vLLM.
    from nbkit.medusa.heads import embedded_heads_dir, load_heads
    from nbkit.medusa.vllm import load_vllm_heads

    out = tmp_path / "vllm-heads"
    nb = run("07_scale_out", tmp_path, monkeypatch, out_dir=str(out), tensor_parallel="2", speculative_tokens="3")
    shown = text_of(cell_with(nb, "exported = export_heads("))
    assert "4 heads x 4 ResBlock(s), shared lm_head" in shown and "token_map" in shown
    assert ("vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --tensor-parallel-size 2 --speculative-config "
            f"'{{\"method\": \"medusa\", \"model\": \"{out.resolve()}\", \"num_speculative_tokens\": 3}}'") in shown
    readme = (out / "README.md").read_text()
    markdown = [o["data"]["text/markdown"] for o in cell_with(nb, "show_commands(").outputs]
    assert markdown == [readme] and "ray start --head" in readme
    back, lm_head = load_vllm_heads(out)
    source = load_heads(embedded_heads_dir(), 576)
    hidden = torch_randn(8, 576)
    assert (source.topk(hidden, lm_head, 10) == back.topk(hidden, lm_head, 10)).all()


def torch_randn(*shape):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.slow
def test_03_without_a_gpu_the_defaults_serve_the_embedded_model(tmp_path, monkeypatch):
    # vicuna-7b's real config.json (and "weights" that must not be fetched): no GPU here, no ALLOW_CPU.
    repo = tmp_path / "mirror" / "lmsys" / "vicuna-7b-v1.3"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000}))
    (repo / "pytorch_model-00001-of-00002.bin").write_bytes(b"w" * 4096)
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NBKIT_GPU", raising=False)
    nb = run("03_download_and_convert", tmp_path, monkeypatch, model="lmsys/vicuna-7b-v1.3",
             heads="FasterDecoding/medusa-vicuna-7b-v1.3")
    note = text_of(cell_with(nb, "fit_model(MODEL"))
    assert "No GPU here" in note and "instead of lmsys/vicuna-7b-v1.3" in note and "ALLOW_CPU" in note
    assert "model  : embedded SmolLM2-135M-Instruct" in text_of(cell_with(nb, "prepared = prepare"))
    fetched = sorted(p.name for p in (tmp_path / "cache" / "hub" / "lmsys--vicuna-7b-v1.3").iterdir())
    assert fetched == ["config.json"]
