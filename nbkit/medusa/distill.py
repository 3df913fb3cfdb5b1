"""Self-distillation data for Medusa heads: the frozen base model answers the project's prompts.

Step 1 (`generate_answers`) writes the model's greedy answers (token ids) to a file; step 2
(`nbkit.medusa.train`) turns them into final-norm hidden states and trains the heads.
Generation runs in bfloat16 (much faster where the CPU has AMX); the hidden states the heads
learn from are recomputed in the serving dtype (fp32), so the heads see what the engine gives them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..chat_format import user_prompt_ids


@torch.inference_mode()
def generate_answers(
    model, tokenizer, prompts: list[str], out_file: Path, max_new_tokens: int = 192,
    batch_size: int = 48, dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Greedy answers, one JSON line per prompt: {"prompt", "prompt_ids", "answer_ids"}. Resumable."""
    out_file = Path(out_file)
    done = set()
    if out_file.exists():
        done = {json.loads(line)["prompt"] for line in out_file.open()}
    todo = [p for p in prompts if p not in done]
    model = model.to(dtype)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Similar lengths in one batch waste less padding.
    encoded = sorted(((p, user_prompt_ids(tokenizer, p)) for p in todo), key=lambda x: len(x[1]))
    start = time.time()
    n_tokens = 0
    with out_file.open("a") as f:
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in chunk])
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=eos,
            )
            for (prompt, ids), row in zip(chunk, out[:, width:].tolist()):
                answer = row[: row.index(eos) + 1] if eos in row else row
                n_tokens += len(answer)
                f.write(json.dumps({"prompt": prompt, "prompt_ids": ids, "answer_ids": answer}) + "\n")
            f.flush()
            rate = n_tokens / (time.time() - start)
            print(f"distill: {i + len(chunk)}/{len(encoded)} answers, {rate:.0f} tok/s", flush=True)
    return out_file
