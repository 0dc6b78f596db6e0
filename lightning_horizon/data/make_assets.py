"""Generate the small instruction and preference data sets shipped with lightning_horizon.

The set is made by this script alone (no outside text, so no licence question): templated tasks that a tiny model
learns within a few hundred steps (arithmetic, counting letters, reversing and sorting, unit conversion, spelling and
a few questions about the project). Output is deterministic: the same seed gives byte-identical files.

Regenerate (from the repository root)::

    python -m lightning_horizon.data.make_assets            # writes lightning_horizon/data/assets/instruct*.jsonl
    python -m lightning_horizon.data.make_assets --check    # exits 1 if the shipped files are out of date

Each line of ``instruct*.jsonl`` is one JSON object ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat form,
optionally with a system message first). Each line of ``preference*.jsonl`` is ``{"prompt", "chosen", "rejected"}``
(optionally with ``"system"``): the same tasks, the correct answer chosen and a corrupted one rejected (a number
changed, words or letters out of order), for the embedded default runs of ``recipes.dpo`` and ``recipes.reward``. Changing this script changes the default tokenizer's cache key (it hashes the data file).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TRAIN_FILE = "instruct.jsonl"
VAL_FILE = "instruct_val.jsonl"
NUM_TRAIN = 3000
NUM_VAL = 200
SEED = 1234
PREFERENCE_TRAIN_FILE = "preference.jsonl"
PREFERENCE_VAL_FILE = "preference_val.jsonl"
NUM_PREFERENCE_TRAIN = 1000
NUM_PREFERENCE_VAL = 100
PREFERENCE_SEED = 4321

WORDS = (
    "apple river stone cloud green orange table window garden yellow silver bridge candle forest pepper rocket "
    "planet marble guitar pencil summer winter autumn spring dragon castle valley meadow basket button rabbit turtle "
    "falcon tiger zebra lemon cherry banana mango grape melon carrot potato tomato onion bread butter cheese honey "
    "coffee water paper letter number circle square shadow mirror engine signal market island harbor ocean desert "
    "mountain thunder little purple violet copper golden simple quiet bright happy gentle rapid steady clever brave "
    "kitten puppy parrot monkey spider beetle lizard salmon shark whale eagle robin sparrow pigeon"
).split()

UNITS = (
    # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("gigabytes", "megabytes", 1024),
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You answer questions exactly.",
)

PROJECT_QA = (
    (
        ("What is lightning_horizon?", "What does lightning_horizon do?", "Tell me about lightning_horizon."),
        "lightning_horizon is a PyTorch Lightning strategy that trains large language models on one GPU by "
        "keeping the weights in host memory and streaming layers to the GPU.",
    ),
    (
        ("Where are the master weights kept?", "Where does lightning_horizon store FP32 weights?"),
        "The FP32 master weights and the optimizer state live in host memory.",
    ),
    (
        ("Which optimizer runs on the CPU?", "Where does the optimizer step run?"),
        "AdamW runs on the CPU, layer by layer, overlapped with GPU work.",
    ),
    (
        ("How do I select the strategy?", "How do I use lightning_horizon in a Trainer?"),
        'Import lightning_horizon and pass strategy="horizon" to the Lightning Trainer.',
    ),
    (
        ("What precision does the GPU compute in?", "Which dtype is streamed to the GPU?"),
        "Layers are streamed to the GPU in BF16; the masters stay in FP32.",
    ),
)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    a, b = (rng.randint(0, 99), rng.randint(0, 99)) if op != "*" else (rng.randint(0, 12), rng.randint(0, 12))
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    prompt = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
    return prompt.format(a=a, op=op, b=b), f"{a} {op} {b} = {result}"


def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    count = word.count(letter)
    times = "time" if count == 1 else "times"
    prompt = f"How many times does the letter '{letter}' appear in '{word}'?"
    return prompt, f"The letter '{letter}' appears {count} {times} in '{word}'."


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 5))
    return f"Reverse the order of the words: {' '.join(words)}", " ".join(reversed(words))


def _reverse_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell '{word}' backwards.", word[::-1]


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    descending = rng.random() < 0.3
    order = "descending" if descending else "ascending"
    prompt = f"Sort these numbers in {order} order: {', '.join(map(str, numbers))}"
    return prompt, ", ".join(map(str, sorted(numbers, reverse=descending)))


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Sort these words alphabetically: {', '.join(words)}", ", ".join(sorted(words))


def _convert_units(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    value = rng.randint(1, 20)
    return f"Convert {value} {src} to {dst}.", f"{value} {src} is {value * factor} {dst}."


def _spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"Spell the word '{word}' letter by letter.", "-".join(word.upper())
    return f"Write '{word}' in capital letters.", word.upper()


def _project_qa(rng: random.Random) -> tuple[str, str]:
    questions, answer = rng.choice(PROJECT_QA)
    return rng.choice(questions), answer


def _largest(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    return f"Which is the largest number: {', '.join(map(str, numbers))}?", f"The largest number is {max(numbers)}."


TASKS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _arithmetic,
    _count_letters,
    _reverse_words,
    _reverse_letters,
    _sort_numbers,
    _sort_words,
    _convert_units,
    _spell,
    _project_qa,
    _largest,
)


def make_example(rng: random.Random) -> dict:
    """One conversation: usually one turn, sometimes two, sometimes with a system message."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.15 else 1):
        prompt, response = rng.choice(TASKS)(rng)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": response})
    return {"messages": messages}


def render(examples: list[dict]) -> str:
    return "".join(json.dumps(example, ensure_ascii=True, separators=(",", ":")) + "\n" for example in examples)


def make_splits(seed: int = SEED, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL) -> tuple[str, str]:
    """Return the (train, validation) JSONL texts; validation conversations never appear in train."""
    return _splits(make_example, lambda example: json.dumps(example, sort_keys=True), seed, num_train, num_val)


def _splits(
    make: Callable[[random.Random], dict | None], key: Callable[[dict], str], seed: int, num_train: int, num_val: int
) -> tuple[str, str]:
    """(train, validation) JSONL texts of examples drawn by ``make`` (None: drawn again), no ``key`` twice."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict] = []
    val: list[dict] = []
    while len(val) < num_val or len(train) < num_train:
        example = make(rng)
        if example is None or key(example) in seen:
            continue
        seen.add(key(example))
        (val if len(val) < num_val else train).append(example)
    return render(train), render(val)


def corrupt(response: str, rng: random.Random) -> str:
    """A wrong answer in the format of ``response``: its last number changed, else its words or letters reordered."""
    numbers = list(re.finditer(r"\d+", response))
    if numbers:
        last = numbers[-1]
        value = int(last.group())
        wrong = value + rng.choice((-1, 1)) * rng.randint(1, 9)
        return response[: last.start()] + str(abs(wrong) if wrong != value else value + 1) + response[last.end() :]
    words = response.split(" ")
    if len(words) > 1:
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    letters = list(response)
    while letters == list(response) and len(set(response)) > 1:
        rng.shuffle(letters)
    return "".join(letters)


def make_preference_pair(rng: random.Random) -> dict | None:
    """One single-turn pair, or None when the answer cannot be corrupted (a one-letter word)."""
    prompt, response = rng.choice(TASKS)(rng)
    rejected = corrupt(response, rng)
    if rejected == response:
        return None
    pair = {"prompt": prompt, "chosen": response, "rejected": rejected}
    if rng.random() < 0.2:
        pair = {"system": rng.choice(SYSTEM_PROMPTS), **pair}
    return pair


def make_preference_splits(
    seed: int = PREFERENCE_SEED, num_train: int = NUM_PREFERENCE_TRAIN, num_val: int = NUM_PREFERENCE_VAL
) -> tuple[str, str]:
    """Return the (train, validation) preference JSONL texts; no prompt appears in both."""
    return _splits(make_preference_pair, lambda pair: pair["prompt"], seed, num_train, num_val)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output folder (default: the package assets)")
    parser.add_argument("--check", action="store_true", help="only check that the files in --out are up to date")
    args = parser.parse_args(argv)
    train, val = make_splits()
    preference_train, preference_val = make_preference_splits()
    outputs = {
        TRAIN_FILE: train,
        VAL_FILE: val,
        PREFERENCE_TRAIN_FILE: preference_train,
        PREFERENCE_VAL_FILE: preference_val,
    }
    if args.check:
        stale = [
            name
            for name, text in outputs.items()
            if not (args.out / name).is_file() or (args.out / name).read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"out of date: {', '.join(stale)} (run python -m lightning_horizon.data.make_assets)")
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out / name)
        print(f"wrote {args.out / name} ({len(text.splitlines())} examples, {len(text.encode()) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
