"""The embedded curriculum's contract: deterministic, answers correct, and the held-out split really held out."""

import re

from data import synthetic

CAPITAL_OF = dict(synthetic.CAPITALS)
HELDOUT_CAPITALS = {k for c, k in synthetic.CAPITALS if synthetic._heldout(c)}


def _problem(question: str) -> str:
    """'What is 3 + 4?' → '3+4'; 'What is the capital of Peru?' → 'Peru'."""
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
    return f"{m[1]}+{m[2]}" if m else re.fullmatch(r"What is the capital of (.+)\?", question)[1]


def _correct(question: str, answer: str) -> bool:
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
    if m:
        return answer == f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
    country = _problem(question)
    return answer == f"The capital of {country} is {CAPITAL_OF[country]}."


def test_deterministic_and_seeded():
    assert synthetic.pretrain_texts(50, seed=3) == synthetic.pretrain_texts(50, seed=3)
    assert synthetic.pretrain_texts(50, seed=3) != synthetic.pretrain_texts(50, seed=4)
    assert synthetic.preference_pairs(20, seed=1) == synthetic.preference_pairs(20, seed=1)


def test_split_is_disjoint_and_answers_are_correct():
    train = synthetic.sft_chats(400, split="train")
    heldout = synthetic.sft_chats(400, split="heldout")
    train_problems = {_problem(c["messages"][0]["content"]) for c in train}
    heldout_problems = {_problem(c["messages"][0]["content"]) for c in heldout}
    assert train_problems and heldout_problems and not train_problems & heldout_problems
    assert len(heldout_problems) < len(train_problems)                    # ~20% held out
    for c in train + heldout:
        assert _correct(c["messages"][0]["content"], c["messages"][1]["content"]), c


def test_preference_pairs_chosen_right_rejected_wrong_and_split():
    for split in ("train", "heldout"):
        for p in synthetic.preference_pairs(400, split=split):
            q = p["prompt"][0]["content"]
            assert _correct(q, p["chosen"]) and not _correct(q, p["rejected"]), p
            assert synthetic._heldout(_problem(q)) == (split == "heldout")


def test_training_pairs_never_reject_a_heldout_answer():
    """DPO on a pair rejecting 'Nairobi' teaches against the held-out answer to 'capital of Kenya?'."""
    for p in synthetic.preference_pairs(400, split="train"):
        if "capital" in p["rejected"]:
            assert p["rejected"].rsplit(" is ", 1)[1].rstrip(".") not in HELDOUT_CAPITALS, p


def test_pretraining_states_every_fact_of_both_splits():
    text = "\n".join(synthetic.pretrain_texts(3000))
    for country, capital in synthetic.CAPITALS:
        assert f"The capital of {country} is {capital}." in text
    for a in range(synthetic.ARITH_MAX + 1):
        for b in range(synthetic.ARITH_MAX + 1):
            assert f"{a} + {b} = {a + b}." in text



def test_passkey_documents_have_the_eval_protocols_layout():
    """Training documents drawn with the protocol's filler are eval/passkey.py's prompts, character for character."""
    import random

    from eval import passkey

    rng, checked = random.Random(0), 0
    while checked < 20:
        n, depth = rng.randint(0, 6), rng.choice([0.0, 0.25, 0.5, 1.0])
        text, key = synthetic.passkey_document(rng, n, depth)
        if synthetic.FILLER in text or n == 0:
            assert text == passkey.passkey_text(n, depth, key, "completion"), (n, depth)
            checked += 1


def test_records_passkey_knobs():
    assert synthetic.records("text", 300, seed=1) == [{"text": t} for t in synthetic.pretrain_texts(300, seed=1)]
    plain = synthetic.records("text", 300, seed=1)
    none = synthetic.records("text", 300, seed=1, passkey_share=0.0)
    assert sum("pass key" in r["text"] for r in plain) > 10 and not any("pass key" in r["text"] for r in none)
    long = synthetic.records("text", 300, seed=1, passkey_share=1.0, passkey_filler=8)
    assert max(len(r["text"]) for r in long) > max(len(r["text"]) for r in plain if "pass key" in r["text"])
