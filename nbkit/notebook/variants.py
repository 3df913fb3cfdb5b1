"""The published Medusa-1 heads, each with the base model it was trained on: the notebooks' MODEL/HEADS choices.

FasterDecoding trained each head set on one base model's final hidden states, so heads only speculate well
(and, for another hidden size, only load) on that base: vicuna-7b-v1.3's and vicuna-7b-v1.5's heads have
the same shapes, and nothing but this table tells them apart. `match_heads` resolves HEADS="auto" to the
heads of MODEL and refuses a published head set for another published base before anything is downloaded.
The per-card plans come from env.resolve_plan through fit.plan_for, sized from each model's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"  # HEADS: the published heads of MODEL (none for a model outside the table)


@dataclass(frozen=True)
class Variant:
    model: str  # the base model's hub id
    heads: str  # FasterDecoding's Medusa-1 heads trained on it
    note: str


VARIANTS = (
    Variant("lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3", "the paper's 7B; 2048 positions"),
    Variant("lmsys/vicuna-13b-v1.3", "FasterDecoding/medusa-vicuna-13b-v1.3", "the paper's 13B; 2048 positions"),
    Variant("lmsys/vicuna-33b-v1.3", "FasterDecoding/medusa-vicuna-33b-v1.3", "the paper's 33B; 2048 positions"),
    Variant("HuggingFaceH4/zephyr-7b-beta", "FasterDecoding/medusa-1.0-zephyr-7b-beta",
            "Mistral-7B fine-tune; 8 KV heads (GQA), 32768 positions"),
    Variant("lmsys/vicuna-7b-v1.5", "FasterDecoding/medusa-1.0-vicuna-7b-v1.5", "Llama-2-7B fine-tune; 4096 positions"),
)
MODELS = tuple(v.model for v in VARIANTS)
HEADS = tuple(v.heads for v in VARIANTS)
# The notebooks' dropdowns (a Colab form also takes a typed value: a folder, a .gguf, your own heads).
MODEL_CHOICES = (*MODELS, "embedded")
HEADS_CHOICES = (AUTO, *HEADS, "none")


class HeadsMismatch(ValueError):
    """Published Medusa heads asked for with another published base model."""


def heads_for(model) -> str | None:
    """The published heads trained on `model`, or None when the table has no heads for it."""
    return next((v.heads for v in VARIANTS if v.model == model), None)


def base_of(heads) -> str | None:
    """The base model a published head set was trained on, or None for heads outside the table."""
    return next((v.model for v in VARIANTS if v.heads == heads), None)


def match_heads(model, heads):
    """HEADS to serve with MODEL: "auto" becomes the table's heads for MODEL (None, plain decoding, for a model
    outside it; "embedded" for the embedded model); published heads for another published base are refused.

    Anything else (a folder, your own heads, "none") is returned unchanged: only shapes can check those, and
    hub.inspect_heads does that once they are downloaded."""
    from ..models import is_embedded

    if isinstance(heads, str) and heads.strip().lower() == AUTO:
        if is_embedded(model):
            return "embedded"
        found = heads_for(model)
        print(f"HEADS = 'auto': {found} (trained on {model})" if found else
              f"HEADS = 'auto': no published Medusa heads for {model}; serving it without speculation "
              f"(published pairs: {', '.join(f'{v.model} + {v.heads}' for v in VARIANTS)})")
        return found
    trained_on = base_of(heads)
    if trained_on is None or trained_on == model:
        return heads
    if model in MODELS:
        raise HeadsMismatch(
            f"HEADS={heads!r} were trained on {trained_on}'s hidden states, not on MODEL={model!r}: they would "
            f"propose wrong tokens (or not load at all). Choose HEADS={heads_for(model)!r} (or 'auto') for "
            f"{model}, or MODEL={trained_on!r} for these heads. Nothing was downloaded.")
    print(f"note: HEADS={heads!r} were trained on {trained_on}; MODEL={model!r} must be that model (a copy of it), "
          "or the heads will rarely be accepted")
    return heads


def dropdown(choices: tuple[str, ...]) -> str:
    """The Colab form comment for a parameter with these choices (the notebooks hold its text; a test compares)."""
    return "#@param [" + ", ".join(f'"{c}"' for c in choices) + "] {allow-input: true}"
