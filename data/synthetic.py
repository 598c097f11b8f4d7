"""Data the project generates itself: seeded, deterministic, nothing downloaded.

Three skills a tiny Mixtral can learn in minutes on CPU, used by the tiny recipes and the
embedded default (`data.path=synthetic`):

* arithmetic:   "What is 3 + 4?" → "3 + 4 = 7."            (operands 0..ARITH_MAX)
* capitals:     "What is the capital of Peru?" → "The capital of Peru is Lima."
* passkey:      the eval protocol's structure (task line, filler, "The pass key is K. Remember it.
                K is the pass key.", more filler, the question, the key) with the protocol's filler
                or generated filler sentences

The curriculum is built so each stage has something measurable to learn:
  pretraining states EVERY fact (all sums, all capitals) as plain text, plus passkey documents;
  SFT teaches the question → answer chat format on the "train" problems only;
  held-out prompts (`split="heldout"`, ~20% of problems reserved by a stable hash) ask about facts
  the model read during pretraining but never saw as a chat — exact match on them measures
  whether SFT taught the format rather than memorised answers;
  DPO pairs (correct answer vs a plausible wrong one) use the same split.
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


ARITH_MAX = 9


def _arith(rng: random.Random, split: str) -> tuple[str, str]:
    """A sum from `split` ("train", "heldout", or "all")."""
    while True:
        a, b = rng.randint(0, ARITH_MAX), rng.randint(0, ARITH_MAX)
        if split == "all" or _heldout(f"{a}+{b}") == (split == "heldout"):
            return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _capital(rng: random.Random, split: str) -> tuple[str, str, str, str]:
    """A capital fact from `split`: (country, capital, question, answer)."""
    pool = [(c, k) for c, k in CAPITALS if split == "all" or _heldout(c) == (split == "heldout")]
    country, capital = rng.choice(pool)
    return country, capital, f"What is the capital of {country}?", f"The capital of {country} is {capital}."


def _fact(rng: random.Random, split: str, arithmetic: bool) -> tuple[str, str]:
    """(question, answer): a sum, or a capital."""
    return _arith(rng, split) if arithmetic else _capital(rng, split)[2:]


COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
THINGS = ["grass", "sky", "sun", "sea", "road", "house", "tree", "car", "cat", "door"]


def _generated_filler(rng: random.Random) -> str:
    return " ".join(f"The {rng.choice(THINGS)} is {rng.choice(COLOURS)}." for _ in range(rng.randint(2, 5)))


def passkey_document(rng: random.Random, n_filler: int, depth: float, key: int | None = None) -> tuple[str, int]:
    """The eval protocol's layout (task, filler × n with the needle at `depth`, question), with the
    protocol's filler sentence or generated ones (half each); returns (text, key)."""
    key = key if key is not None else rng.randint(10000, 99999)
    before = round(n_filler * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    filler = (lambda: FILLER) if rng.random() < 0.5 else (lambda: _generated_filler(rng))
    prefix = " ".join(filler() for _ in range(before))
    suffix = " ".join(filler() for _ in range(n_filler - before))
    return "\n".join(p for p in (PASSKEY_TASK, prefix, needle, suffix, PASSKEY_QUESTION) if p), key


def pretrain_texts(n: int, seed: int = 0, max_filler: int = 3, passkey_share: float = 0.1,
                   qa_share: float = 0.5, max_lines: int = 1) -> list[str]:
    """Plain documents: sums and capital facts (all of them, train and held-out), each stated either
    as a sentence or, with probability `qa_share`, as the plain-text question followed by that sentence
    ("What is the capital of Peru? The capital of Peru is Lima."), and passkey documents answered
    with the key.

    Measured on the tiny preset (2 layers, hidden 64), 200 steps × 16 rows: documents of ONE fact line
    are what let it learn to look back at all — with 3-8 lines per document (attention spread over
    ~100 tokens) it never learned to copy the country from the question into the answer (held-out
    exact match after SFT 32%, sums recalled 10/100); with one line per document and a constant lr
    it copies 8/8 held-out countries and recalls 60/100 sums after 200 steps, 100/100 after 400.
    Passkey documents are kept short and rare (10%): long ones took most of the tokens and the
    tiny model still retrieved 0% of keys."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        if rng.random() < passkey_share:
            text, key = passkey_document(rng, rng.randint(0, max_filler), rng.random())
            docs.append(f"{text} {key}.")
            continue
        lines = []
        for _ in range(rng.randint(1, max_lines)):
            q, a = _fact(rng, "all", rng.random() < 0.5)
            lines.append(f"{q} {a}" if rng.random() < qa_share else a)
        docs.append(" ".join(lines))
    return docs


def sft_chats(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """[INST] conversations {"messages": [...]} whose answers can be checked exactly."""
    rng = random.Random(seed + (1_000_003 if split == "heldout" else 0))
    chats = []
    for i in range(n):
        q, a = _fact(rng, split, i % 2 == 0)
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
            country, capital, q, a = _capital(rng, split)
            # a training pair never rejects a held-out capital: DPO would learn "Nairobi is wrong" from
            # the train pairs, training against the answer to the held-out "capital of Kenya?"
            other = rng.choice([k for c, k in CAPITALS if k != capital and (split != "train" or not _heldout(c))])
            rejected = f"The capital of {country} is {other}."
        pairs.append({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": rejected})
    return pairs


def records(kind: str, n: int, seed: int = 0, split: str = "train", passkey_share: float = 0.1,
            passkey_filler: int = 3) -> list[dict]:
    """Canonical records of `kind` ("text", "messages", "preference") for `data.path=synthetic`;
    `passkey_share` and `passkey_filler` shape the pretraining documents (see `pretrain_texts`)."""
    if kind == "text":
        return [{"text": t} for t in pretrain_texts(n, seed, max_filler=passkey_filler, passkey_share=passkey_share)]
    if kind == "messages":
        return sft_chats(n, seed, split)
    if kind == "preference":
        return preference_pairs(n, seed, split)
    raise ValueError(f"unknown kind {kind!r}")
