"""The published Medusa variants as the notebooks' MODEL/HEADS choices: one table, a plan per card from each
model's real config.json shape (tests/unit/data/medusa_variants, read through the hub mirror), and heads for
another base refused before anything is downloaded.

env.py's KV arithmetic may change: these tests assert what fits where and that a refusal carries its numbers,
not exact GiB figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nbkit.notebook import env, fit, hub, scale_out, variants

DATA = Path(__file__).resolve().parent / "data" / "medusa_variants"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def card(name: str, gib: float, cap: tuple[int, int]) -> env.Environment:
    return env.Environment(colab=True, python="3.12", torch="2.8", cuda="12.8", gpus=[env.Gpu(name, gib, gib, cap)])


# Total memory as torch reports it on Colab (a T4's 15360 MiB is 14.7 GiB there).
CARDS = {"T4": card("Tesla T4", 14.74, (7, 5)), "L4": card("NVIDIA L4", 22.5, (8, 9)),
         "A100-40": card("NVIDIA A100-SXM4-40GB", 39.4, (8, 0)),
         "A100-80": card("NVIDIA A100-SXM4-80GB", 79.2, (8, 0))}
# What each card serves: an engine where the arithmetic leaves no doubt, "fits" where the engine depends on the
# KV budget, "refused" where even Q4_K_M weights + heads leave no room for one 2048-token conversation.
EXPECTED = {
    "lmsys/vicuna-7b-v1.3": {"T4": "llamacpp", "L4": "fits", "A100-40": "torch", "A100-80": "torch"},
    "lmsys/vicuna-13b-v1.3": {"T4": "llamacpp", "L4": "llamacpp", "A100-40": "fits", "A100-80": "torch"},
    "lmsys/vicuna-33b-v1.3": {"T4": "refused", "L4": "refused", "A100-40": "llamacpp", "A100-80": "fits"},
    "HuggingFaceH4/zephyr-7b-beta": {"T4": "llamacpp", "L4": "fits", "A100-40": "torch", "A100-80": "torch"},
    "lmsys/vicuna-7b-v1.5": {"T4": "llamacpp", "L4": "fits", "A100-40": "torch", "A100-80": "torch"},
}


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(DATA))
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    return DATA


def test_the_table_pairs_each_published_base_with_its_heads():
    assert {v.model: v.heads for v in variants.VARIANTS} == {
        "lmsys/vicuna-7b-v1.3": "FasterDecoding/medusa-vicuna-7b-v1.3",
        "lmsys/vicuna-13b-v1.3": "FasterDecoding/medusa-vicuna-13b-v1.3",
        "lmsys/vicuna-33b-v1.3": "FasterDecoding/medusa-vicuna-33b-v1.3",
        "HuggingFaceH4/zephyr-7b-beta": "FasterDecoding/medusa-1.0-zephyr-7b-beta",
        "lmsys/vicuna-7b-v1.5": "FasterDecoding/medusa-1.0-vicuna-7b-v1.5",
    }
    assert set(EXPECTED) == set(variants.MODELS)
    assert sorted(p.parent.relative_to(DATA).as_posix() for p in DATA.glob("*/*/config.json")) == sorted(
        variants.MODELS)  # every model's config shape is stored


def test_the_stored_configs_are_the_published_shapes():
    """Guards the test data against typos: parameter counts come out at the published model sizes."""
    sizes = {m: env.sizes_from_config(DATA / m)["params_b"] for m in variants.MODELS}
    assert sizes["lmsys/vicuna-7b-v1.3"] == pytest.approx(6.74, abs=0.01)
    assert sizes["lmsys/vicuna-7b-v1.5"] == pytest.approx(6.74, abs=0.01)
    assert sizes["lmsys/vicuna-13b-v1.3"] == pytest.approx(13.02, abs=0.01)
    assert sizes["lmsys/vicuna-33b-v1.3"] == pytest.approx(32.5, abs=0.1)
    assert sizes["HuggingFaceH4/zephyr-7b-beta"] == pytest.approx(7.24, abs=0.01)


@pytest.mark.parametrize("model", list(EXPECTED))
@pytest.mark.parametrize("name", list(CARDS))
def test_each_variant_fits_or_is_refused_with_the_arithmetic(mirror, model, name):
    expected = EXPECTED[model][name]
    if expected == "refused":
        with pytest.raises(env.PlanError) as err:
            fit.plan_for(env=CARDS[name], model=model)
        why = str(err.value)
        assert CARDS[name].gpu.name in why and "weights" in why and "heads" in why and "overhead" in why
        assert len(re.findall(r"\d+\.\d", why)) >= 4 and "GiB" in why and "Nothing was downloaded" in why
    else:
        plan = fit.plan_for(env=CARDS[name], model=model)
        assert plan.fits() and plan.need_gib <= CARDS[name].gpu.total_gib + 1e-9
        if expected != "fits":
            assert plan.engine == expected, plan
        assert re.search(r"\d+\.\d", plan.reason)  # the plan shows its arithmetic
    assert sorted(p.name for p in hub.local_dir_for(model).iterdir()) == ["config.json"]  # kilobytes, no weights


def test_a_plan_without_room_for_one_conversation_is_refused(mirror):
    """Old: choose_plan's last resort gave vicuna-33b on an L4 the 0.8 GiB left over (517 tokens), labelled it
    "does NOT fit", and plan_for served it anyway (its KV being the remainder, Plan.fits() was true)."""
    with pytest.raises(env.PlanError, match=r"NVIDIA L4.*\d+ tokens.*fewer than one 2048-token conversation"):
        fit.plan_for(env=CARDS["L4"], model="lmsys/vicuna-33b-v1.3")


def test_heads_auto_is_the_table_s_heads_for_the_model(capsys):
    for v in variants.VARIANTS:
        assert variants.match_heads(v.model, "auto") == v.heads
    assert variants.match_heads("embedded", "auto") == "embedded"
    assert variants.match_heads("acme/own-model", "auto") is None  # plain decoding, said so
    assert "no published Medusa heads for acme/own-model" in capsys.readouterr().out


def test_heads_for_another_published_base_are_refused():
    with pytest.raises(variants.HeadsMismatch) as err:
        variants.match_heads("lmsys/vicuna-7b-v1.5", "FasterDecoding/medusa-vicuna-7b-v1.3")  # same shapes
    why = str(err.value)
    assert "trained on lmsys/vicuna-7b-v1.3" in why and "MODEL='lmsys/vicuna-7b-v1.5'" in why
    assert "HEADS='FasterDecoding/medusa-1.0-vicuna-7b-v1.5'" in why and "Nothing was downloaded" in why
    with pytest.raises(variants.HeadsMismatch, match="medusa-vicuna-13b-v1.3"):
        variants.match_heads("lmsys/vicuna-13b-v1.3", "FasterDecoding/medusa-1.0-zephyr-7b-beta")


def test_heads_outside_the_table_pass_unchanged(tmp_path, capsys):
    for heads in (str(tmp_path), "acme/my-heads", "none", "embedded", None, ""):
        assert variants.match_heads("lmsys/vicuna-7b-v1.3", heads) == heads
    # A model outside the table with published heads: maybe a copy of their base; said, not refused.
    assert variants.match_heads(str(tmp_path), "FasterDecoding/medusa-vicuna-7b-v1.3").endswith("7b-v1.3")
    assert "trained on lmsys/vicuna-7b-v1.3" in capsys.readouterr().out


def test_the_notebook_cells_refuse_a_mismatch_before_any_download(mirror):
    """fit_model (the cell after the parameters) and export_heads (07) resolve HEADS and refuse a mismatch."""
    cpu = env.Environment(colab=False, python="3.12", torch="2.8", cuda=None)
    with pytest.raises(variants.HeadsMismatch):
        fit.fit_model("lmsys/vicuna-13b-v1.3", "FasterDecoding/medusa-vicuna-33b-v1.3", cpu)
    assert fit.fit_model("lmsys/vicuna-13b-v1.3", "auto", CARDS["A100-40"]) == (
        "lmsys/vicuna-13b-v1.3", "FasterDecoding/medusa-vicuna-13b-v1.3")
    with pytest.raises(variants.HeadsMismatch):
        scale_out.export_heads("lmsys/vicuna-33b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3")
    assert not (Path(hub.local_dir_for("FasterDecoding/medusa-vicuna-7b-v1.3"))).exists()


WITH_MODEL = ["00_run_all", "03_download_and_convert", "04_serve_medusa", "05_chat", "06_benchmark", "07_scale_out"]


def test_every_notebook_with_a_model_parameter_is_checked():
    with_model = [p.stem for p in sorted(NOTEBOOKS.glob("*.ipynb")) if 'MODEL = ' in p.read_text()]
    assert with_model == WITH_MODEL


@pytest.mark.parametrize("name", WITH_MODEL)
def test_the_parameters_cells_offer_the_table_as_dropdowns(name):
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
    params = ["".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", [])]
    lines = params[0].splitlines()
    model_at = lines.index(f'MODEL = "lmsys/vicuna-7b-v1.3"  {variants.dropdown(variants.MODEL_CHOICES)}')
    heads_at = lines.index(f'HEADS = "auto"  {variants.dropdown(variants.HEADS_CHOICES)}')
    # $NBKIT_MODEL / $NBKIT_HEADS (and papermill) still override what the form holds.
    assert lines[model_at + 1].startswith('MODEL = param("model", MODEL)')
    assert lines[heads_at + 1].startswith('HEADS = param("heads", HEADS)')
