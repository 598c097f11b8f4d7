"""The export's Hugging Face tokenizer files (data/hf_tokenizer.py): `AutoTokenizer` gives the project's
tokens for any text, and `apply_chat_template` gives data/chat.py's and mistral_common's ids for any chat."""

import json
import random
import shutil

import pytest
from mistral_common.protocol.instruct.validator import ValidationMode
from transformers import AutoTokenizer

from data.chat import ChatFormatError, encode_chat, encode_prompt, validate_messages
from data.hf_tokenizer import write_hf_tokenizer
from data.tokenizer import default_tokenizer_path, load_tokenizer
from test_chat import TEXTS, _conversations, _reference

# "<s>" / "</s>" typed inside a text are control tokens to every HF tokenizer (data/hf_tokenizer.py)
PLAIN = [t for t in TEXTS if "<s>" not in t and "</s>" not in t]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(default_tokenizer_path(), folder)
    shutil.copy(default_tokenizer_path(), folder / "tokenizer.model")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019\n\t.,!?-_'\"éßø数字🤖👍🏽\u200b\ufeff\r") + [" ", "  ", "   ", "\n\n", "the", " of"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _chat_ids(hf, messages):
    out = hf.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_any_text_tokenizes_as_sentencepiece_with_bos(hf, tokenizer):
    texts = PLAIN + _random_texts(2000)
    wrong = [t for t in texts if hf(t).input_ids != [tokenizer.bos_id] + tokenizer.encode(t)]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. {wrong[:3]!r}"
    # the example of the issue: BOS and the dummy-prefix space piece
    assert hf("The capital").input_ids == [1, 415, 5565]
    assert hf(" hello  world\n", add_special_tokens=False).input_ids == tokenizer.encode(" hello  world\n")
    assert hf.decode(hf("héllo  数字\n").input_ids, skip_special_tokens=True) == "héllo  数字\n"


def test_control_token_strings_in_text_with_split_special_tokens(hf, tokenizer):
    """`<s>`, `</s>`, `<unk>` typed in a text: with `split_special_tokens=True` the export's tokenizer encodes
    them as text, as sentencepiece and mistral_common do (BOS still added); without it they are control
    tokens, as in every HF tokenizer (the chat template relies on that)."""
    texts = [t for t in TEXTS if t not in PLAIN] + ["a <s> b </s> <unk> c", "<s>[INST] hi [/INST]</s>", "</s>", "x<s>y"]
    for t in texts:
        assert hf(t, split_special_tokens=True).input_ids == [tokenizer.bos_id] + tokenizer.encode(t), t
    assert hf("a </s>").input_ids[-1] == tokenizer.eos_id


def _accepted(messages) -> bool:
    try:
        validate_messages(messages, for_training=True)
    except ChatFormatError:
        return False
    return True


def _plain(convs):
    """The chats the project accepts (data/chat.py refuses messages holding "<s>", "</s>", "<unk>")."""
    return [m for m in convs if _accepted(m)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chat_template_equals_data_chat_and_mistral_common(hf, tokenizer, seed):
    convs = _plain(_conversations(seed=seed, n=60))
    convs += _plain([[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                     for a, b in zip(_random_texts(100, seed + 10), _random_texts(100, seed + 20)) if a and b])
    assert len(convs) > 100
    for messages in convs:
        ids = _chat_ids(hf, messages)
        assert ids == encode_chat(messages, tokenizer)[0] == _reference(messages, ValidationMode.finetuning), messages
        prompt = messages[:-1]  # ending with a user turn: the prompt the model answers
        assert _chat_ids(hf, prompt) == encode_prompt(prompt, tokenizer) == _reference(prompt, ValidationMode.test)


def test_chat_template_on_the_real_chats(hf, tokenizer, shared_data):
    rows = json.loads((shared_data / "llama_factory_demo" / "alpaca_en_demo.json").read_text())
    dpo = json.loads((shared_data / "llama_factory_demo" / "dpo_en_demo.json").read_text())
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    convs = [[{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
              {"role": "assistant", "content": r["output"]}] for r in rows[:300]]
    convs += [[{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
              + [{"role": "assistant", "content": r[side]["value"]}] for r in dpo[:150] for side in ("chosen", "rejected")]
    convs = _plain(convs)
    assert len(convs) > 500
    for messages in convs:
        assert _chat_ids(hf, messages) == encode_chat(messages, tokenizer)[0] == _reference(messages, ValidationMode.finetuning)


def test_refused_chats_are_the_ones_a_chat_template_cannot_reproduce(hf, tokenizer):
    """Why data/chat.py refuses "<s>", "</s>", "<unk>" in a message: mistral_common encodes them as text, every
    HF chat template as control tokens. Every other chat of the same texts is accepted and equal (above)."""
    refused = [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}] for t in TEXTS if t not in PLAIN]
    refused += [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"a {c} b"}] for c in ("<s>", "</s>", "<unk>")]
    for messages in refused:
        assert not _accepted(messages)
        assert _chat_ids(hf, messages) != _reference(messages, ValidationMode.finetuning), messages


def test_chat_template_refuses_roles_out_of_order(hf):
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
