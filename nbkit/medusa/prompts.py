"""Instruction prompts written by the project for self-distilling Medusa heads.

The base model answers these; the heads learn to predict its own continuations. Prompts are
built from task templates x subjects with a fixed seed, so the set is reproducible; a held-out
split (by index after shuffling, plus hand-written prompts no template produces) measures the
heads on text they were not trained on.
"""

from __future__ import annotations

import random

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
