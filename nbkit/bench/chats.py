"""Multi-turn chats for the conversation benchmark, from MT-Bench's two-turn questions.

MT-Bench (Zheng et al. 2023) has 80 questions in 8 categories, each a first turn and a follow-up that refers
to the answer ("Rewrite your previous response..."). A chat of 6 user turns chains 3 questions of one category
in question-id order: q1 turn 1, q1 turn 2, q2 turn 1, ... . No head, policy or threshold of nbkit was
trained or tuned on these questions. The file is not committed (docs/bench/sources.md says how to get it): it
is read from the prompts folder ($NBKIT_PROMPTS_DIR) or a path, and its sha256 is checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..medusa.prompts import prompts_dir

MT_BENCH_FILE = "mt_bench_question.jsonl"
MT_BENCH_ORIGIN = ("MT-Bench's 80 two-turn questions (Zheng et al. 2023), github lm-sys/FastChat "
                   "fastchat/llm_judge/data/mt_bench/question.jsonl at commit 0e6d3e4beaab66f4d3f93db72541a4abab8af28d")
MT_BENCH_LICENSE = "Apache-2.0 (repository license)"
MT_BENCH_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"


@dataclass(frozen=True)
class Chat:
    name: str  # category and question ids, e.g. "writing-81-82-83"
    turns: tuple[str, ...]  # the user messages, in order


def read_questions(path: str | Path | None = None) -> list[dict]:
    """MT-Bench's rows ({"question_id", "category", "turns"}) from `path`, or from the prompts folder, where the
    recorded sha256 is checked (a path given explicitly may be another file of that format)."""
    file = Path(path) if path else prompts_dir() / MT_BENCH_FILE
    if not file.is_file():
        raise FileNotFoundError(f"the conversation benchmark needs {file} ({MT_BENCH_ORIGIN}); "
                                "see docs/bench/sources.md")
    data = file.read_bytes()
    if not path and hashlib.sha256(data).hexdigest() != MT_BENCH_SHA256:
        raise ValueError(f"{file} is not the recorded MT-Bench file (sha256 differs); see docs/bench/sources.md")
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def chain(rows: list[dict], turns: int = 6) -> list[Chat]:
    """Chats of `turns` user messages: consecutive questions of one category (by question id) chained whole,
    so every follow-up comes right after the answer it refers to. The chats of different categories alternate
    (the first 8 chats cover the 8 categories); a category's leftover questions are dropped."""
    by_category: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["question_id"]):
        by_category.setdefault(row["category"], []).append(row)
    per_category = []
    for category, questions in by_category.items():
        chats, current, ids = [], [], []
        for q in questions:
            current += q["turns"]
            ids.append(str(q["question_id"]))
            if len(current) >= turns:
                chats.append(Chat(f"{category}-{'-'.join(ids)}", tuple(current[:turns])))
                current, ids = [], []
        per_category.append(chats)
    longest = max((len(c) for c in per_category), default=0)
    return [chats[i] for i in range(longest) for chats in per_category if i < len(chats)]
