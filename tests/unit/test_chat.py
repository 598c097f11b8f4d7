"""[INST] encoding: token for token against mistral_common's own v1 instruct tokenizer."""

import functools
import json
import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from data.chat import IGNORE_INDEX, ChatFormatError, encode_chat, encode_prompt
from data.tokenizer import default_tokenizer_path, load_tokenizer

TEXTS = [
    "Hello",
    "What is 2+2?",
    "  leading spaces",
    "trailing spaces   ",
    "repeated    inner     spaces",
    "line one\nline two\n\nline four",
    "\ttabs\tand\ttabs\t",
    "café, naïve, Ångström, façade",
    "中文测试：你好，世界！日本語のテキスト",
    "emoji 👩‍👩‍👧 family, 👍🏽 thumbs, 🇫🇷 flag",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "literal [INST] inside [/INST] text",
    "an eos </s> and bos <s> in text",
    "\n",
    " ",
    "mixed\r\nline endings\r",
    "code:\n```python\ndef f(x):\n    return x * 2\n```",
    "Ελληνικά και русский текст",
    "a" * 300,
]
# texts a chat message may hold: the control-token strings are refused (data/chat.py CONTROL_STRINGS)
CHAT_TEXTS = [t for t in TEXTS if not any(c in t for c in ("<s>", "</s>", "<unk>"))]


@functools.lru_cache(maxsize=None)
def _mistral_tokenizer(mode):
    return MistralTokenizer.from_file(str(default_tokenizer_path()), mode=mode)


def _reference(messages, mode):
    tok = _mistral_tokenizer(mode)
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[cls[m["role"]](content=m["content"]) for m in messages])
    return tok.encode_chat_completion(request).tokens


def _conversations(seed=0, n=60):
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        turns = rng.randint(1, 4)
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": rng.choice(CHAT_TEXTS)})
        for _ in range(turns):
            msgs.append({"role": "user", "content": rng.choice(CHAT_TEXTS)})
            msgs.append({"role": "assistant", "content": rng.choice(CHAT_TEXTS)})
        convs.append(msgs)
    # every text in every position at least once
    for t in CHAT_TEXTS:
        convs.append([{"role": "system", "content": t}, {"role": "user", "content": t}, {"role": "assistant", "content": t}])
    return convs


@pytest.mark.parametrize("messages", _conversations(), ids=lambda m: f"{len(m)}msgs")
def test_training_encoding_matches_mistral_common(messages, tokenizer):
    ids, labels = encode_chat(messages, tokenizer)
    assert ids == _reference(messages, ValidationMode.finetuning)
    assert len(labels) == len(ids)


@pytest.mark.parametrize("messages", _conversations(seed=1, n=30), ids=lambda m: f"{len(m)}msgs")
def test_prompt_encoding_matches_mistral_common(messages, tokenizer):
    prompt = messages[:-1]  # ends with a user turn
    assert encode_prompt(prompt, tokenizer) == _reference(prompt, ValidationMode.test)


def test_labels_cover_exactly_assistant_tokens_and_eos(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    ids, labels = encode_chat(messages, tokenizer)
    a1 = tokenizer.encode("Hello there") + [tokenizer.eos_id]
    a2 = tokenizer.encode("Goodbye") + [tokenizer.eos_id]
    kept = [(i, l) for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert [l for _, l in kept] == a1 + a2
    assert all(i == l for i, l in kept)
    # the BOS and every [INST] ... [/INST] token are masked
    assert labels[0] == IGNORE_INDEX and ids[0] == tokenizer.bos_id
    assert sum(l != IGNORE_INDEX for l in labels) == len(a1) + len(a2)


def test_system_prompt_joined_with_blank_line(tokenizer):
    ids = encode_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenizer)
    assert ids == [tokenizer.bos_id] + tokenizer.encode("[INST] S\n\nU [/INST]")


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([], "empty conversation"),
        ([{"role": "assistant", "content": "x"}], "expected role 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected role 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "message 1: system message must be the first"),
        ([{"role": "user", "content": "a"}], "last message must be an assistant"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}], "message 0 (user): empty content"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}], "content must be a string"),
        ([{"role": "bot", "content": "a"}], "unknown role 'bot'"),
        ([{"role": "system", "content": "s"}], "no user turn"),
        ([{"role": "user", "content": "an eos </s> here"}, {"role": "assistant", "content": "b"}],
         "message 0 (user): contains the control-token string '</s>'"),
        ([{"role": "system", "content": "<s>"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "message 0 (system): contains the control-token string '<s>'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "x<unk>y"}],
         "message 1 (assistant): contains the control-token string '<unk>'"),
    ],
)
def test_invalid_conversations_are_named(messages, needle, tokenizer):
    with pytest.raises(ChatFormatError) as err:
        encode_chat(messages, tokenizer)
    assert needle in str(err.value)


def test_prompt_must_end_with_user(tokenizer):
    with pytest.raises(ChatFormatError, match="last message must be a user turn"):
        encode_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenizer)


def test_checkpoint_folder_tokenizer_wins(tmp_path):
    import shutil

    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.path == tmp_path / "tokenizer.model"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    # a folder without one falls back to the v1 model
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_tokenizer(empty).path == default_tokenizer_path()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_real_sharegpt_and_alpaca_conversations_match(shared_data, tokenizer):
    rows = json.loads((shared_data / "llama_factory_demo" / "alpaca_en_demo.json").read_text())[:40]
    dpo = json.loads((shared_data / "llama_factory_demo" / "dpo_en_demo.json").read_text())[:40]
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    convs = [
        [{"role": "user", "content": (r["instruction"] + ("\n" + r["input"] if r["input"] else ""))},
         {"role": "assistant", "content": r["output"]}]
        for r in rows
    ]
    convs += [
        [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
        + [{"role": "assistant", "content": r["chosen"]["value"]}]
        for r in dpo
    ]
    for messages in convs:
        assert encode_chat(messages, tokenizer)[0] == _reference(messages, ValidationMode.finetuning)


@pytest.mark.parametrize("system, user, answer", [
    ("", "What is the capital of France?", "Paris."),               # empty system prompt = none (mistral_common)
    ("  ", "hi", "hello"),                                           # blank but not empty: kept, as mistral_common
    ("Be brief.", "line one\r\nline two", "ok\r\n"),                 # Windows line ends are text
    ("\ufeffsystem with a BOM", "\ufeffhi", "\ufeffthere"),          # a BOM inside a message is text
    ("zero\u200bwidth", "a\u200bb\u200c\u200d", "c\u2060d"),         # zero-width characters are text
])
def test_real_dataset_quirks_encode_as_mistral_common(system, user, answer, tokenizer):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]
    assert encode_chat(messages, tokenizer)[0] == _reference(messages, ValidationMode.finetuning)
    assert encode_prompt(messages[:2], tokenizer) == _reference(messages[:2], ValidationMode.test)


def test_held_out_chat_with_an_empty_system_prompt(shared_data, tokenizer, tmp_path):
    """A real chat with `{"role": "system", "content": ""}` first trains as the same chat without it,
    through the data loader too, as mistral_common encodes it."""
    from data.dataset import load_canonical
    from train.config import compose

    row = json.loads((shared_data / "llama_factory_demo" / "alpaca_en_demo.json").read_text())[-1]
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["output"]}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    cfg = compose("sft", [f"data.path={path}"]).data
    (record,) = load_canonical(cfg, "messages", seed=0)
    ids = encode_chat(record["messages"], tokenizer)[0]
    assert ids == encode_chat(messages[1:], tokenizer)[0] == _reference(messages, ValidationMode.finetuning)
