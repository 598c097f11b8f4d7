"""Chats for the comparisons against mistral_common (tests/unit/test_chat.py, test_hf_tokenizer.py): texts a
user's data holds (control-token strings, unicode, whitespace), role orders mistral_common merges, tool calls,
and `reference`, the oracle itself: mistral_common's own instruct tokenizer of each version."""

from __future__ import annotations

import functools
import random

from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from data.chat import IGNORE_INDEX

TEXTS = [
    "Hello", "What is 2+2?", "  leading spaces", "trailing spaces   ", "repeated    inner     spaces",
    "line one\nline two\n\nline four", "\ttabs\tand\ttabs\t", "café, naïve, Ångström, façade",
    "中文测试：你好，世界！日本語のテキスト", "emoji 👩‍👩‍👧 family, 👍🏽 thumbs, 🇫🇷 flag",
    "digits 0123456789 and 3.14159 and 1,000,000", "literal [INST] inside [/INST] text",
    "an eos </s> and bos <s> in text", "<unk> and [TOOL_CALLS] [AVAILABLE_TOOLS] [TOOL_RESULTS] strings",
    "<s>", "</s>", "<del>struck</del> and <s>strike</s> in HTML", "\n", " ", "mixed\r\nline endings\r",
    "code:\n```python\ndef f(x):\n    return x * 2\n```", "Ελληνικά και русский текст", '{"json": "looking", "n": 1}',
    "\ufeffa BOM and zero\u200bwidth", "a" * 120,
]
CONTROL_STRINGS = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]")
# what an HF tokenizer reads as text (it reads the control-token strings as control tokens: data/hf_tokenizer.py)
PLAIN_TEXTS = [t for t in TEXTS if not any(c in t for c in CONTROL_STRINGS)]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                      "b": {"type": "number"}}}}},
]
# arguments and tool results as users write them; CANONICAL_* are JSON as json.dumps writes it (what an HF chat
# template can reproduce: it cannot parse JSON, data/hf_tokenizer.py)
CANONICAL_ARGS = [{"city": "Paris"}, {"a": 1, "b": 2.5}, {}, {"city": "Zürich"}]
ARGS = CANONICAL_ARGS + ['{"city": "Paris"}', '{"x":  [1,2]}', "", "not json"]
CANONICAL_RESULTS = ['{"temp": 20}', "plain text result", "", "[1, 2, 3]", '{"a": "ünï"}', "sunny, 20 °C", "3.5", "7"]
RESULTS = CANONICAL_RESULTS + ['{"temp":20}', '{"a": "</s>"}']
ARGS = ARGS + [{"city": "Zürich </s>"}]


def call_id(rng) -> str:
    return "".join(rng.choice("abcdefghijkABCDEFG0123456789") for _ in range(9))


def chat(rng: random.Random, *, tools: bool, for_training: bool = True, odd: bool = True, canonical: bool = False,
         texts=TEXTS):
    """(messages, tools or None). `odd`: also role orders mistral_common merges (user after user, a system
    message between turns, answer after answer); `canonical`: tool JSON as json.dumps writes it."""
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": rng.choice(texts + [""])})
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": rng.choice(texts + [""])})
        if odd and rng.random() < 0.15:
            msgs.append({"role": "user", "content": rng.choice(texts)})
        if odd and rng.random() < 0.1:
            msgs += [{"role": "system", "content": rng.choice(texts)}, {"role": "user", "content": rng.choice(texts)}]
        if tools and rng.random() < 0.4:
            args, results = (CANONICAL_ARGS, CANONICAL_RESULTS) if canonical else (ARGS, RESULTS)
            calls = [{"id": call_id(rng), "type": "function",
                      "function": {"name": rng.choice(["get_weather", "add"]), "arguments": rng.choice(args)}}
                     for _ in range(rng.randint(1, 2))]
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": rng.choice(results)} for c in calls]
        msgs.append({"role": "assistant", "content": rng.choice(texts)})
        if odd and rng.random() < 0.1:
            msgs.append({"role": "assistant", "content": rng.choice(texts)})
    if not for_training:
        while msgs[-1]["role"] == "assistant":
            msgs.pop()
        if msgs[-1]["role"] == "system":
            msgs.append({"role": "user", "content": rng.choice(texts)})
    return msgs, (TOOLS if tools and rng.random() < 0.7 else None)


def mutate(rng: random.Random, msgs: list[dict]) -> list[dict]:
    """One change that may make a chat invalid, or merely odd: refusals are compared too."""
    msgs = [dict(m) for m in msgs]
    k, i = rng.randrange(7), rng.randrange(len(msgs))
    if k == 0:
        msgs.insert(0, {"role": "assistant", "content": "x"})
    elif k == 1 and len(msgs) > 1:
        del msgs[i]
    elif k == 2:
        msgs[i]["content"] = ""
    elif k == 3:
        msgs.insert(i, {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"})
    elif k == 4 and msgs[i].get("tool_calls"):
        msgs[i]["tool_calls"] = [dict(msgs[i]["tool_calls"][0], id="short")]
    elif k == 5:
        msgs.append({"role": "system", "content": "late"})
    elif k == 6:
        msgs[i] = dict(msgs[i], role="assistant")
    return msgs


@functools.lru_cache(maxsize=None)
def mistral_tokenizer(path: str, for_training: bool) -> MistralTokenizer:
    return MistralTokenizer.from_file(path, mode=ValidationMode.finetuning if for_training else ValidationMode.test)


def reference(messages, path, *, for_training: bool, tools=None) -> tuple[list[int], list[int]]:
    """mistral_common's (ids, labels) of a chat: ids from `encode_chat_completion`; labels from the same
    steps message by message (validate, normalize, encode each message; the assistant messages' tokens are
    the labels). Raises whatever mistral_common raises for a chat it refuses."""
    mt = mistral_tokenizer(str(path), for_training)
    request = ChatCompletionRequest(messages=messages, tools=tools)
    ids = mt.encode_chat_completion(request).tokens
    instruct = mt.instruct_tokenizer
    normal = mt._instruct_request_normalizer.from_chat_completion_request(
        mt._chat_completion_request_validator.validate_request(request))
    first, last = instruct.find_first_last_user(normal)
    labels = [IGNORE_INDEX]
    for i, m in enumerate(normal.messages):
        if m.role == "user":
            tokens = instruct.encode_user_message(m, normal.available_tools, i == last, i == first,
                                                  system_prompt=normal.system_prompt, force_img_first=True)[0]
        elif m.role == "tool":
            tokens = instruct.encode_tool_message(m, i < last)[0]
        else:
            assert isinstance(m, AssistantMessage)
            tokens = instruct.encode_assistant_message(m, i < last)
        labels += tokens if m.role == "assistant" else [IGNORE_INDEX] * len(tokens)
    assert len(labels) == len(ids)
    return ids, labels
