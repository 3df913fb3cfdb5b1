"""Prompt sources for self-distilling and measuring Medusa heads.

The base model answers these; the heads learn to predict its own continuations. Sources:
- `templates`: task templates x subjects written by the project (what the shipped heads were trained on);
- `handwritten`: a few prompts no template produces (always held out);
- public human-written sets (`PUBLIC_SOURCES`), read from a local file whose origin and license are
  recorded here. Their data is never committed: put the file in the prompts folder ($NBKIT_PROMPTS_DIR,
  default <cache>/prompts) or pass a path. docs/bench/sources.md says how each file was obtained.

Every source is deduplicated on normalised text, and `split` assigns train/held-out by a hash of that
text, so a prompt lands on the same side whatever the order or the other prompts of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUBJECTS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "climate change",
    "the water cycle", "volcanoes", "the Roman Empire", "quantum computing", "the human heart",
    "electric cars", "honey bees", "the stock market", "vaccines", "the internet", "coffee",
    "the moon landing", "renewable energy", "the printing press", "DNA", "earthquakes",
    "the Great Wall of China", "blockchain", "sleep", "dinosaurs", "the Olympic Games",
    "recycling", "the immune system", "jazz music", "the solar system", "ancient Egypt",
    "artificial intelligence", "rainforests", "inflation", "the brain", "chess", "gravity",
    "the Renaissance", "ocean tides", "social media", "meditation", "the steam engine",
    "bacteria", "democracy", "the Amazon river", "penguins", "3D printing", "tea", "glaciers",
    "the periodic table", "cryptography", "the Industrial Revolution", "coral reefs",
    "nutrition", "space exploration", "the Silk Road", "bicycles", "electricity", "volunteering",
    "public libraries", "trains", "mountains", "deserts", "friendship", "time management",
    "learning a language", "gardening", "photography", "cooking pasta", "running", "yoga",
    "saving money", "remote work", "video games", "robots", "rain", "clouds", "the ocean",
    "elephants", "wolves", "owls", "trees", "bread", "cheese", "chocolate", "music theory",
    "the violin", "painting", "poetry", "Shakespeare", "the Moon", "Mars", "satellites",
    "airplanes", "submarines", "bridges", "skyscrapers", "cities", "farming", "fishing",
    "the printing of money", "taxes", "banks", "markets", "cars", "traffic", "public transport",
    "hospitals", "exercise", "water", "fire", "wind", "snow", "autumn", "spring", "summer holidays",
    "winter", "birthdays", "weddings", "museums", "zoos", "parks", "camping", "hiking", "maps",
    "compasses", "clocks", "calendars", "numbers", "prime numbers", "fractions", "geometry",
    "statistics", "probability", "algorithms", "databases", "operating systems", "the cloud",
    "passwords", "email", "spreadsheets", "websites", "smartphones", "batteries", "solar panels",
    "wind turbines", "nuclear power", "magnets", "light", "sound", "rainbows", "lightning",
    "hurricanes", "rivers", "lakes", "islands", "caves", "the Arctic", "Antarctica", "the Sahara",
    "cats", "dogs", "horses", "butterflies", "ants", "spiders", "sharks", "whales", "dolphins",
]

THINGS = [
    "a lost robot", "a brave mouse", "a lighthouse keeper", "a talking tree", "a young wizard",
    "an old sailor", "a curious cat", "a dragon who loves books", "a time traveler", "a small town",
    "a rainy day", "a secret garden", "a friendly ghost", "a space station", "a busy baker",
    "a forgotten key", "a magic paintbrush", "a snowy mountain village", "a clever fox",
    "a detective", "a chef", "a programmer", "a musician", "a teacher", "a farmer", "a pilot",
]

HOWTOS = [
    "make a cup of tea", "change a flat tire", "start a vegetable garden", "write a good resume",
    "learn to code", "improve my sleep", "prepare for a job interview", "save money each month",
    "bake bread at home", "train for a 5k run", "organize my desk", "study for an exam",
    "plant a tree", "make new friends", "keep a houseplant alive", "back up my computer",
    "write a thank-you note", "plan a trip", "cook rice", "learn to swim", "reduce stress",
    "speak in public", "read more books", "clean a laptop keyboard", "make a budget",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the largest element of a list", "counts the vowels in a string",
    "sorts a list of numbers", "checks whether a word is a palindrome", "sums the digits of a number",
    "converts Celsius to Fahrenheit", "finds the average of a list", "removes duplicates from a list",
    "returns the Fibonacci sequence up to n", "merges two sorted lists", "counts words in a sentence",
    "finds the second smallest number in a list", "capitalizes every word in a sentence",
]

PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("Python", "JavaScript"), ("summer", "winter"),
    ("trains", "planes"), ("books", "movies"), ("the sun", "the moon"), ("cities", "villages"),
    ("solar power", "wind power"), ("running", "swimming"), ("email", "letters"), ("rivers", "lakes"),
    ("democracy", "monarchy"), ("bacteria", "viruses"), ("weather", "climate"), ("RAM", "storage"),
]

PEOPLE = ["my manager", "a friend", "my teacher", "a customer", "my neighbor", "the team", "my landlord"]

TOPIC_TEMPLATES = [
    "Explain {s} to a beginner.", "What is {s}?", "Tell me three interesting facts about {s}.",
    "Write a short paragraph about {s}.", "Why is {s} important?", "Summarize the history of {s}.",
    "Give me a simple explanation of {s} for a ten-year-old.", "What are the main benefits of {s}?",
    "List five key words related to {s} and explain each one.", "Write a haiku about {s}.",
    "Write a short poem about {s}.", "What are common misconceptions about {s}?",
    "Describe {s} in two sentences.", "How does {s} affect everyday life?",
    "Write a quiz question about {s} with its answer.", "What would happen if there were no {s}?",
    "Give an example of {s} in the real world.", "What should everyone know about {s}?",
    "Write a tweet about {s}.", "Create a short lesson plan about {s}.",
]

OTHER_TEMPLATES = [
    ("Write a short story about {t}.", "t"), ("Write a limerick about {t}.", "t"),
    ("Describe a day in the life of {t}.", "t"), ("How do I {h}?", "h"),
    ("Give me step-by-step instructions to {h}.", "h"), ("What are some tips to {h}?", "h"),
    ("Write a Python function that {c}.", "c"), ("Write a JavaScript function that {c}.", "c"),
    ("Explain how to write code that {c}.", "c"), ("Compare {a} and {b}.", "p"),
    ("What is the difference between {a} and {b}?", "p"), ("Which is better, {a} or {b}? Why?", "p"),
    ("Write a short email to {who} about {s}.", "ws"), ("Write a polite message to {who} asking for help.", "w"),
]

# Hand-written prompts that no template produces: always held out.
EXTRA_EVAL_PROMPTS = [
    "What is the capital of Australia, and why was it chosen?",
    "Write a short product description for a reusable water bottle.",
    "I feel nervous before exams. Any advice?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is 17 times 23? Show your work.",
    "Suggest a name for a bakery and explain it.",
    "Why do leaves change color in the fall?",
    "Write a recipe for a simple vegetable soup.",
]


def _expand() -> list[str]:
    prompts = [t.format(s=s) for t in TOPIC_TEMPLATES for s in SUBJECTS]
    rng = random.Random(1234)
    for template, kind in OTHER_TEMPLATES:
        if kind == "t":
            prompts += [template.format(t=t) for t in THINGS]
        elif kind == "h":
            prompts += [template.format(h=h) for h in HOWTOS]
        elif kind == "c":
            prompts += [template.format(c=c) for c in CODE_TASKS]
        elif kind == "p":
            prompts += [template.format(a=a, b=b) for a, b in PAIRS]
        elif kind == "w":
            prompts += [template.format(who=w) for w in PEOPLE]
        elif kind == "ws":
            prompts += [template.format(who=rng.choice(PEOPLE), s=s) for s in SUBJECTS[:60]]
    return sorted(set(prompts))


def distill_prompts(n_eval: int = 120, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out) prompts. Held-out = `n_eval` shuffled template prompts + hand-written ones."""
    prompts = _expand()
    random.Random(seed).shuffle(prompts)
    held_out = prompts[:n_eval] + EXTRA_EVAL_PROMPTS
    return prompts[n_eval:], held_out


# ---------------------------------------------------------------------------------------------------------------
# Named sources, dedup and a deterministic split.


def normalize(text: str) -> str:
    """Case, accents, punctuation and whitespace folded away: two prompts that differ only there are one prompt."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def dedup(prompts: list[str]) -> list[str]:
    """First occurrence of each normalised prompt, in order; empty prompts dropped."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        key = normalize(p)
        if key and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def is_held_out(prompt: str, fraction: float, salt: str = "nbkit") -> bool:
    """Stable per-prompt coin: sha256(salt + normalised text) below `fraction` of the hash range."""
    digest = hashlib.sha256(f"{salt}\0{normalize(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split(prompts: list[str], held_out_fraction: float, salt: str = "nbkit") -> tuple[list[str], list[str]]:
    """(train, held_out) after dedup; each prompt's side depends only on its own text and the salt."""
    unique = dedup(prompts)
    held = [p for p in unique if is_held_out(p, held_out_fraction, salt)]
    held_keys = {normalize(p) for p in held}
    return [p for p in unique if normalize(p) not in held_keys], held


def _instruction_and_input(instruction: str, extra: str) -> str:
    """One user turn: the instruction, then its input/context (if any) after a blank line."""
    instruction, extra = instruction.strip(), (extra or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def parse_self_instruct(lines: list[str]) -> list[str]:
    """Self-instruct format (seed_tasks.jsonl, user_oriented_instructions.jsonl): instruction + first input."""
    out = []
    for line in lines:
        if line.strip():
            row = json.loads(line)
            instances = row.get("instances") or [{}]
            out.append(_instruction_and_input(row["instruction"], instances[0].get("input", "")))
    return out


def parse_dolly(lines: list[str]) -> list[str]:
    """databricks-dolly-15k format: {"instruction", "context", "response", "category"} per line."""
    return [_instruction_and_input(r["instruction"], r.get("context", ""))
            for r in (json.loads(line) for line in lines if line.strip())]


def parse_gsm8k(lines: list[str]) -> list[str]:
    """grade-school-math format (train.jsonl): {"question", "answer"} per line; the question is the prompt."""
    return [json.loads(line)["question"].strip() for line in lines if line.strip()]


def parse_clinc(lines: list[str]) -> list[str]:
    """clinc/oos-eval data_full.json: {"train"|"val"|...: [[query, intent], ...]}; the train, val and
    oos_train queries are prompts (the test splits are left alone)."""
    data = json.loads("\n".join(lines))
    return [q.strip() for part in ("train", "val", "oos_train") for q, _ in data.get(part, [])]


@dataclass(frozen=True)
class PublicSource:
    name: str
    file: str  # file name inside the prompts folder
    parse: Callable[[list[str]], list[str]]
    role: str  # "train" (may be distilled from) or "measure" (held out only: never train or tune on it)
    origin: str
    license: str
    sha256: str = ""  # of the file as recorded in docs/bench/sources.md; checked when set


PUBLIC_SOURCES = {
    s.name: s for s in (
        PublicSource(
            "selfinstruct_seed", "seed_tasks.jsonl", parse_self_instruct, "train",
            "175 human-written seed tasks of Self-Instruct (Wang et al. 2023), github yizhongw/self-instruct "
            "data/seed_tasks.jsonl at commit 0b26ccaa415992100fa32df62d41b994cf928e23",
            "Apache-2.0 (repository license)",
            "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48"),
        PublicSource(
            "user_oriented", "user_oriented_instructions.jsonl", parse_self_instruct, "measure",
            "252 expert-written user-oriented instructions (Self-Instruct human evaluation set), github "
            "yizhongw/self-instruct human_eval/user_oriented_instructions.jsonl at commit "
            "0b26ccaa415992100fa32df62d41b994cf928e23; its authors ask that it never be used for training",
            "Apache-2.0 (repository license)",
            "81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e"),
        PublicSource(
            "dolly", "databricks-dolly-15k.jsonl", parse_dolly, "train",
            "databricks-dolly-15k (Databricks employees, 2023), the file databricks-dolly-15k.jsonl as "
            "published by Databricks; not obtainable on the build machines (only Git LFS pointers there)",
            "CC-BY-SA-3.0"),
        PublicSource(
            "gsm8k", "gsm8k_train.jsonl", parse_gsm8k, "train",
            "7473 grade-school math word problems written by human problem writers (Cobbe et al. 2021), github "
            "openai/grade-school-math grade_school_math/data/train.jsonl at commit "
            "3101c7d5072418e28b9008a6636bde82a006892c (the train split; test.jsonl is never read)",
            "MIT (repository license)",
            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
        PublicSource(
            "clinc_oos", "clinc_oos_data_full.json", parse_clinc, "train",
            "crowd-sourced queries to a task-oriented assistant, 150 intents (Larson et al. 2019), github "
            "clinc/oos-eval data/data_full.json at commit 828f8093932c8fe6ca7936c3d2e52903b1c523de "
            "(train, val and oos_train queries; the test splits are never read)",
            "CC-BY-3.0 (repository license)",
            "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"),
    )
}
SOURCE_NAMES = ("templates", "handwritten", *PUBLIC_SOURCES)


def prompts_dir() -> Path:
    """$NBKIT_PROMPTS_DIR, else <nbkit cache>/prompts."""
    if os.environ.get("NBKIT_PROMPTS_DIR"):
        return Path(os.environ["NBKIT_PROMPTS_DIR"])
    from ..models import cache_dir

    return cache_dir() / "prompts"


def load_public(name: str, path: str | Path | None = None) -> list[str]:
    """A public source's prompts, deduplicated, from `path` or the prompts folder; a clear error if absent."""
    source = PUBLIC_SOURCES[name]
    file = Path(path) if path else prompts_dir() / source.file
    if not file.is_file():
        raise FileNotFoundError(f"prompt source {name!r} needs {file} ({source.origin}); see docs/bench/sources.md")
    data = file.read_bytes()
    if source.sha256 and not path and hashlib.sha256(data).hexdigest() != source.sha256:
        raise ValueError(f"{file} is not the recorded version of {name!r} (sha256 differs); see docs/bench/sources.md")
    return dedup(source.parse(data.decode().splitlines()))


def source_prompts(name: str, path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(train, held_out) of one named source.

    templates: the split the shipped heads were trained with; handwritten: all held out;
    a "measure" source: all held out; a "train" source: a 10% hash split (held-out side for checks only).
    """
    if name == "templates":
        train, held = distill_prompts(n_eval=120)
        return train, [p for p in held if p not in EXTRA_EVAL_PROMPTS]
    if name == "handwritten":
        return [], list(EXTRA_EVAL_PROMPTS)
    if name not in PUBLIC_SOURCES:
        raise KeyError(f"unknown prompt source {name!r}; known: {', '.join(SOURCE_NAMES)}")
    prompts = load_public(name, path)
    if PUBLIC_SOURCES[name].role == "measure":
        return [], prompts
    return split(prompts, 0.1, salt=name)


def held_out_prompts(name: str, n: int | None = None, path: str | Path | None = None) -> list[str]:
    """`n` held-out prompts of a source (all when n is None) in a fixed order that mixes the file's groups
    (public files list related tasks together, so their first lines are not a sample)."""
    held = source_prompts(name, path)[1]
    if name in PUBLIC_SOURCES:
        held = sorted(held, key=lambda p: hashlib.sha256(normalize(p).encode()).digest())
    return held if n is None else held[:n]


def parse_source_list(spec: str) -> list[str]:
    """"templates,user_oriented" or "all" -> validated source names."""
    names = list(SOURCE_NAMES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in SOURCE_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown prompt source(s) {unknown or spec!r}; known: {', '.join(SOURCE_NAMES)}")
    return names


def training_prompts(names: list[str], exclude: list[str] | None = None,
                     caps: dict[str, int | None] | None = None) -> list[str]:
    """Train sides of several sources, deduplicated across them, minus every prompt of `exclude` (held-out
    sets measured against). A measuring-only source can never be trained on: naming one is an error.
    caps[name] = N keeps N prompts of that source (the first in hash order: a fixed sample that mixes the
    file's groups), so that no single large or narrow source dominates the mix."""
    measure_only = [n for n in names if n == "handwritten" or PUBLIC_SOURCES.get(n, None) and
                    PUBLIC_SOURCES[n].role == "measure"]
    if measure_only:
        raise ValueError(f"prompt source(s) {measure_only} are for measuring only, never for training")
    banned = {normalize(p) for n in exclude or [] for p in held_out_prompts(n)}
    prompts = []
    for n in names:
        train = source_prompts(n)[0]
        cap = (caps or {}).get(n)
        if cap is not None:
            train = sorted(train, key=lambda p: hashlib.sha256(normalize(p).encode()).digest())[:cap]
        prompts += train
    return [p for p in dedup(prompts) if normalize(p) not in banned]


def parse_mix(spec: str) -> dict[str, int | None]:
    """"templates:1200,selfinstruct_seed,gsm8k:600" -> {name: cap or None (all)}, names validated."""
    mix: dict[str, int | None] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, cap = item.partition(":")
        if cap and not cap.isdigit():
            raise ValueError(f"bad prompt count in {item!r}: expected NAME or NAME:COUNT")
        mix[name] = int(cap) if cap else None
    parse_source_list(",".join(mix))
    return mix
