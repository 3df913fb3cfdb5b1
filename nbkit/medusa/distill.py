"""Self-distillation data for Medusa heads: the frozen base model answers the project's prompts.

Step 1 (`generate_answers`) writes the model's greedy answers (token ids) to a file; step 2
(`nbkit.medusa.train`) turns them into final-norm hidden states and trains the heads.
Generation runs in bfloat16 (much faster where the CPU has AMX); the hidden states the heads
learn from are recomputed in the serving dtype (fp32), so the heads see what the engine gives them.
"""

from __future__ import annotations

import hashlib
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


def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16). Without it (e.g. an AVX2-only
    EPYC) a bf16 matmul ran 40x slower than fp32, so generation and training use fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if fast_bf16() else torch.float32


@torch.inference_mode()
def greedy_with_hidden(model, prompt_ids: list[list[int]], max_new_tokens: int, eos: int, pad: int,
                       ) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy answers of a batch and, for each answer token, the final-norm hidden state that chose it.

    answer[i] = argmax(lm_head(hidden[i])): hidden[0] is the last prompt position's state, hidden[i] the
    state at answer token i-1 -- the layout `train.compute_features` recomputes with a second forward,
    which this makes unnecessary. Answers stop after their first EOS."""
    from transformers import DynamicCache

    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()  # filled in place by every forward
    out = model.model(input_ids=input_ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    next_position = position[:, -1:] + 1
    hidden, tokens = [], []
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    for step in range(max_new_tokens):
        h = out.last_hidden_state[:, -1]
        token = model.lm_head(h).argmax(-1)
        hidden.append(h.to(torch.bfloat16))
        tokens.append(token)
        done |= token == eos
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(prompt_ids), 1, dtype=mask.dtype)], 1)
        out = model.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
                          use_cache=True)
        next_position = next_position + 1
    hidden_t, tokens_t = torch.stack(hidden, 1), torch.stack(tokens, 1)  # [B, steps, H], [B, steps]
    results = []
    for row in range(len(prompt_ids)):
        answer = tokens_t[row].tolist()
        n = answer.index(eos) + 1 if eos in answer else len(answer)
        results.append((answer[:n], hidden_t[row, :n].clone()))
    return results


def distill_with_hidden(model, tokenizer, prompts: list[str], out_dir: Path, max_new_tokens: int = 64,
                        batch_size: int = 64, max_prompt_tokens: int = 320) -> Path:
    """`generate_answers` and the features in one pass (fp32: the serving dtype). Resumable, and any prefix
    of the run is usable: each batch appends its answers to answers.jsonl and saves its hidden states as
    hidden-NNNNN.pt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers_file = out_dir / "answers.jsonl"
    done = {json.loads(line)["prompt"] for line in answers_file.open()} if answers_file.exists() else set()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # A fixed shuffle, sorted by length only within windows of 4 batches: a run stopped early is still a
    # sample of every source, and left padding (prefill costs as much as decoding here) stays small.
    todo = sorted((p for p in prompts if p not in done), key=lambda p: hashlib.sha256(p.encode()).digest())
    # Prompts over `max_prompt_tokens` are skipped: one of 1350 tokens would pad its whole batch to that.
    window = 4 * batch_size
    encoded = [(p, user_prompt_ids(tokenizer, p)) for p in todo]
    skipped = sum(len(ids) > max_prompt_tokens for _, ids in encoded)
    encoded = [x for x in encoded if len(x[1]) <= max_prompt_tokens]
    encoded = [x for w in range(0, len(encoded), window)
               for x in sorted(encoded[w : w + window], key=lambda x: len(x[1]))]
    if skipped:
        print(f"distill: skipped {skipped} prompts longer than {max_prompt_tokens} tokens", flush=True)
    start, n_tokens, chunk_id = time.time(), 0, len(list(out_dir.glob("hidden-*.pt")))
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        results = greedy_with_hidden(model, [ids for _, ids in chunk], max_new_tokens, eos, pad)
        torch.save({"prompts": [p for p, _ in chunk], "hidden": [h for _, h in results]},
                   out_dir / f"hidden-{chunk_id:05d}.pt")
        chunk_id += 1
        with answers_file.open("a") as f:
            for (prompt, ids), (answer, _) in zip(chunk, results):
                f.write(json.dumps({"prompt": prompt, "prompt_ids": ids, "answer_ids": answer}) + "\n")
        n_tokens += sum(len(a) for a, _ in results)
        print(f"distill: {i + len(chunk)}/{len(encoded)} answers, {n_tokens / (time.time() - start):.0f} tok/s",
              flush=True)
    return out_dir
