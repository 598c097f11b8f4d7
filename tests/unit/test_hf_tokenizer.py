"""The export's Hugging Face tokenizer files (data/hf_tokenizer.py), for both tokenizer versions: `AutoTokenizer`
gives the project's tokens for any text, and `apply_chat_template` gives data/chat.py's and mistral_common's
ids for any chat (v3: tools, tool calls and results included); what differs (control-token strings typed in a
text) is shown, not hidden."""

import json
import random
import shutil

import pytest
from transformers import AutoTokenizer

from chat_cases import CONTROL_STRINGS, PLAIN_TEXTS, TEXTS, chat, reference
from data.chat import encode_chat, encode_prompt
from data.hf_tokenizer import write_hf_tokenizer
from data.tokenizer import default_tokenizer_path, load_tokenizer, v3_tokenizer_path

PLAIN = PLAIN_TEXTS
PATHS = {"v1": default_tokenizer_path, "v3": v3_tokenizer_path}


def _folder(tmp_path_factory, version):
    folder = tmp_path_factory.mktemp(f"hf_tokenizer_{version}")
    write_hf_tokenizer(PATHS[version](), folder)
    shutil.copy(PATHS[version](), folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return AutoTokenizer.from_pretrained(_folder(tmp_path_factory, "v1"))


@pytest.fixture(scope="module")
def hf3(tmp_path_factory):
    return AutoTokenizer.from_pretrained(_folder(tmp_path_factory, "v3"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def v3():
    return load_tokenizer(v3_tokenizer_path())


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019\n\t.,!?-_'\"éßø数字🤖👍🏽\u200b\ufeff\r") + [" ", "  ", "   ", "\n\n", "the", " of"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _chat_ids(hf, messages, tools=None):
    out = hf.apply_chat_template(messages, tools=tools, tokenize=True)
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


def _reference(messages, version, tools=None, for_training=True):
    return reference(messages, PATHS[version](), for_training=for_training, tools=tools)[0]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_any_text_tokenizes_as_sentencepiece_in_both_versions(version, hf, hf3, tokenizer, v3):
    fast, tok = (hf, tokenizer) if version == "v1" else (hf3, v3)
    texts = PLAIN + _random_texts(1000, seed=5)
    wrong = [t for t in texts if fast(t).input_ids != [tok.bos_id] + tok.encode(t)]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. {wrong[:3]!r}"


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_chat_template_equals_data_chat_and_mistral_common(version, seed, hf, hf3, tokenizer, v3):
    """Generated chats (v3: tools, tool calls, tool results; merged roles, system prompts anywhere mistral_common
    allows them), as training chats and as prompts: template == data/chat.py == mistral_common."""
    fast, tok = (hf, tokenizer) if version == "v1" else (hf3, v3)
    rng = random.Random(seed)
    for n in range(150):
        for_training = n % 2 == 0
        messages, tools = chat(rng, tools=version == "v3", for_training=for_training, canonical=True, texts=PLAIN)
        ours = encode_chat(messages, tok, tools)[0] if for_training else encode_prompt(messages, tok, tools)
        assert _chat_ids(fast, messages, tools) == ours == _reference(messages, version, tools, for_training), messages
    more = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
            for a, b in zip(_random_texts(100, seed + 10), _random_texts(100, seed + 20)) if b]
    for messages in more:
        assert _chat_ids(fast, messages) == encode_chat(messages, tok)[0] == _reference(messages, version), messages


def test_chat_template_on_the_real_chats(hf, tokenizer, shared_data):
    rows = json.loads((shared_data / "llama_factory_demo" / "alpaca_en_demo.json").read_text())
    dpo = json.loads((shared_data / "llama_factory_demo" / "dpo_en_demo.json").read_text())
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    convs = [[{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
              {"role": "assistant", "content": r["output"]}] for r in rows[:300]]
    convs += [[{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
              + [{"role": "assistant", "content": r[side]["value"]}] for r in dpo[:150] for side in ("chosen", "rejected")]
    convs = [c for c in convs if not any(s in m["content"] for m in c for s in CONTROL_STRINGS)]
    assert len(convs) > 500
    for messages in convs:
        assert _chat_ids(hf, messages) == encode_chat(messages, tokenizer)[0] == _reference(messages, "v1")


def test_chat_template_on_the_real_tool_chats(hf3, v3, shared_data):
    """LLaMA-Factory's glaive tool-call demo through data/formats.py, in the v3 export's template."""
    from data.formats import canonical
    from data.readers import read_records

    path = shared_data / "llama_factory_demo" / "glaive_toolcall_en_demo.json"
    records = [canonical(r, "auto", "messages", version="v3") for r in read_records(str(path))][:150]
    same = 0
    for r in records:
        ours = encode_chat(r["messages"], v3, r.get("tools"))[0]
        assert ours == _reference(r["messages"], "v3", r.get("tools"))
        same += _chat_ids(hf3, r["messages"], r.get("tools")) == ours
    # the data's arguments and results are JSON as json.dumps writes it, except where it is not (then the
    # template, which cannot parse JSON, writes them as given): nearly all are equal
    assert same >= 0.9 * len(records), f"{same} of {len(records)}"


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_control_token_strings_in_text_are_what_differs(version, hf, hf3, tokenizer, v3):
    """What an HF tokenizer cannot do: "<s>", "</s>", "[INST]" (v3) typed inside a message. data/chat.py (and the
    project's server) encode them as text, as mistral_common does; a chat template renders the chat to a
    string and reads them back as control tokens. With `split_special_tokens=True` plain text keeps them as
    text (but a chat template needs its control tokens, so that is no help there)."""
    fast, tok = (hf, tokenizer) if version == "v1" else (hf3, v3)
    strings = ["<s>", "</s>"] + (["[INST]", "[/INST]", "[TOOL_CALLS]"] if version == "v3" else [])
    for c in strings:
        text = f"a {c} b"
        assert fast(text, split_special_tokens=True).input_ids == [tok.bos_id] + tok.encode(text)
        assert fast(text).input_ids != [tok.bos_id] + tok.encode(text)
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
        ours = encode_chat(messages, tok)[0]
        assert ours == _reference(messages, version)
        assert _chat_ids(fast, messages) != ours  # the documented difference


def test_v1_template_refuses_tools(hf):
    with pytest.raises(Exception, match="v3 tokenizer"):
        hf.apply_chat_template([{"role": "user", "content": "a"}],
                               tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
