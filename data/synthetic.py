"""Data the project generates itself: seeded, deterministic, nothing downloaded.

Three skills a tiny Mixtral can learn in minutes on CPU, used by the tiny recipes and the
embedded default (`data.path=synthetic`):

* arithmetic:   "What is 23 + 14?" → "23 + 14 = 37."
* capitals:     "What is the capital of Peru?" → "The capital of Peru is Lima."
* passkey:      the eval protocol's structure (filler, "The pass key is K. Remember it. K is
                the pass key.", more filler, the question) with generated filler sentences

`pretrain_texts` writes them as plain documents, `sft_chats` as [INST] conversations and
`preference_pairs` as (prompt, correct answer, plausible wrong answer). `split="heldout"`
draws from a disjoint set of problems (different seeds for passkeys; arithmetic operand pairs
and capital questions reserved by a hash), so held-out accuracy measures generalisation.
"""

from __future__ import annotations

import random
import zlib

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Cuba", "Havana"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Mali", "Bamako"),
    ("Chad", "N'Djamena"), ("Fiji", "Suva"), ("Laos", "Vientiane"), ("Oman", "Muscat"), ("Qatar", "Doha"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Mexico", "Mexico City"),
    ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Israel", "Jerusalem"), ("Jordan", "Amman"), ("Syria", "Damascus"),
]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize them. I will quiz you about the important information there.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _heldout(key: str) -> bool:
    """Stable ~20% split of problems, independent of Python's hash seed."""
    return zlib.crc32(key.encode()) % 5 == 0


def _arith(rng: random.Random, split: str) -> tuple[str, str]:
    while True:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if _heldout(f"{a}+{b}") == (split == "heldout"):
            return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _capital(rng: random.Random, split: str) -> tuple[str, str, str]:
    pool = [(c, k) for c, k in CAPITALS if _heldout(c) == (split == "heldout")]
    country, capital = rng.choice(pool)
    return country, capital, f"What is the capital of {country}?"


def passkey_document(rng: random.Random, n_filler: int, depth: float, key: int | None = None) -> tuple[str, int]:
    """Filler × n with the passkey sentence at `depth` (0 = start, 1 = end), then the question."""
    key = key if key is not None else rng.randint(10000, 99999)
    before = round(n_filler * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    parts = [PASSKEY_TASK] + [FILLER] * before + [needle] + [FILLER] * (n_filler - before) + [PASSKEY_QUESTION]
    return " ".join(parts), key


def pretrain_texts(n: int, seed: int = 0, max_filler: int = 8) -> list[str]:
    """Plain documents mixing the three skills (answers included)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            lines = [_arith(rng, "train")[1] for _ in range(rng.randint(3, 8))]
            docs.append(" ".join(lines))
        elif kind == 1:
            facts = [f"The capital of {c} is {k}." for c, k, _ in (_capital(rng, "train") for _ in range(rng.randint(3, 8)))]
            docs.append(" ".join(facts))
        else:
            text, key = passkey_document(rng, rng.randint(1, max_filler), rng.random())
            docs.append(f"{text} {key}.")
    return docs


def sft_chats(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """[INST] conversations {"messages": [...]} whose answers can be checked exactly."""
    rng = random.Random(seed + (1_000_003 if split == "heldout" else 0))
    chats = []
    for i in range(n):
        if i % 2 == 0:
            q, a = _arith(rng, split)
        else:
            country, capital, q = _capital(rng, split)
            a = f"The capital of {country} is {capital}."
        chats.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return chats


def preference_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """{"prompt": [user], "chosen": correct answer, "rejected": plausible wrong answer}."""
    rng = random.Random(seed + (2_000_003 if split == "heldout" else 7))
    pairs = []
    for i in range(n):
        if i % 2 == 0:
            q, a = _arith(rng, split)
            left, total = a.rsplit(" = ", 1)
            wrong = int(total.rstrip(".")) + rng.choice([-10, -2, -1, 1, 2, 10])
            rejected = f"{left} = {wrong}."
        else:
            country, capital, q = _capital(rng, split)
            a = f"The capital of {country} is {capital}."
            other = rng.choice([k for _, k in CAPITALS if k != capital])
            rejected = f"The capital of {country} is {other}."
        pairs.append({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": rejected})
    return pairs


def records(kind: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Canonical records of `kind` ("text", "messages", "preference") for `data.path=synthetic`."""
    if kind == "text":
        return [{"text": t} for t in pretrain_texts(n, seed)]
    if kind == "messages":
        return sft_chats(n, seed, split)
    if kind == "preference":
        return preference_pairs(n, seed, split)
    raise ValueError(f"unknown kind {kind!r}")
