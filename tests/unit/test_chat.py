"""Chat encoding, token for token and label for label, against mistral_common's own instruct tokenizers:
v1 (Mixtral-8x7B) and v3 (Mixtral-8x22B, tool calls), on ≥ 500 generated chats per version (control-token
strings in text, merged roles, tool calls and results), hand-written ones and the real data of ../shared/data."""

import json
import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode

from chat_cases import TEXTS, chat, mistral_tokenizer, mutate, reference
from data.chat import IGNORE_INDEX, ChatFormatError, encode_chat, encode_prompt
from data.tokenizer import default_tokenizer_path, load_tokenizer, v3_tokenizer_path

CHAT_TEXTS = TEXTS


def _reference(messages, mode, path=None):
    """mistral_common's ids for a v1 (default) chat in `mode` (finetuning: training; test: a prompt)."""
    return reference(messages, path or default_tokenizer_path(), for_training=mode == ValidationMode.finetuning)[0]


def _conversations(seed=0, n=60):
    rng = random.Random(seed)
    convs = [chat(rng, tools=False, odd=False)[0] for _ in range(n)]
    for t in CHAT_TEXTS:  # every text in every position at least once
        convs.append([{"role": "system", "content": t}, {"role": "user", "content": t}, {"role": "assistant", "content": t}])
    return convs


@pytest.fixture(scope="module")
def v3():
    return load_tokenizer(v3_tokenizer_path())


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("for_training", [True, False], ids=["training", "prompt"])
def test_generated_chats_equal_mistral_common(version, for_training):
    """340 chats per version and mode (half of them mutated, some of those invalid): whatever mistral_common
    encodes is encoded to the same ids (and, for training, labels) here; whatever it refuses, we refuse."""
    path = default_tokenizer_path() if version == "v1" else v3_tokenizer_path()
    tok = load_tokenizer(path)
    assert tok.version == version
    rng = random.Random(7)
    equal, refused, wrong = 0, 0, []
    for n in range(340):
        msgs, tools = chat(rng, tools=version == "v3", for_training=for_training)
        if n % 2:
            msgs = mutate(rng, msgs)
        try:
            ref = reference(msgs, path, for_training=for_training, tools=tools)
        except Exception:  # noqa: BLE001 - mistral_common refuses with many exception types
            ref = None
        try:
            ours = encode_chat(msgs, tok, tools) if for_training else (encode_prompt(msgs, tok, tools), None)
        except ChatFormatError as e:
            ours = e
        if ref is None:
            refused += 1
            if not isinstance(ours, ChatFormatError):
                wrong.append(("accepted what mistral_common refuses", msgs))
        elif isinstance(ours, ChatFormatError):
            wrong.append((f"refused: {ours}", msgs))
        elif ours[0] != ref[0] or (for_training and ours[1] != ref[1]):
            wrong.append(("differs", msgs))
        else:
            equal += 1
    assert not wrong, f"{len(wrong)} of 340 differ, e.g. {wrong[:2]}"
    assert equal >= 250 and refused >= 10, (equal, refused)


def test_text_holding_control_strings_is_text(tokenizer, v3):
    """"<s>", "</s>", "[INST]" typed in a message are accepted and encoded as the characters they are."""
    for tok, path in ((tokenizer, default_tokenizer_path()), (v3, v3_tokenizer_path())):
        for text in ("Strike <s>this</s> out.", "</s>", "[INST] not a turn [/INST]", "<unk>", "[TOOL_CALLS]"):
            msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": f"ok {text}"}]
            ids, labels = encode_chat(msgs, tok)
            assert (ids, labels) == reference(msgs, path, for_training=True)
            assert ids.count(tok.eos_id) == 1 and ids.count(tok.bos_id) == 1
            # the only control tokens are the turn's own [INST] [/INST] (v3): none in the text's place
            assert sum(i in tok.control.values() for i in ids) == (2 if tok.version == "v3" else 0)


def test_v3_folder_encodes_with_control_tokens(tmp_path):
    """The issue's example: a folder holding the v3 model as tokenizer.model gives [1, 3, ...], not
    [1, 1501, 17057, ...] ("[INST]" spelled as text, v1's scheme)."""
    import shutil

    shutil.copy(v3_tokenizer_path(), tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert (tok.version, tok.vocab_size) == ("v3", 32768)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    ids = encode_prompt(msgs, tok)
    assert ids[:2] == [1, 3] and ids == reference(msgs, v3_tokenizer_path(), for_training=False)[0]
    assert load_tokenizer(None).version == "v1"


def test_v2_tokenizer_is_refused_by_name():
    from data.tokenizer import mistral_common_file

    with pytest.raises(ValueError, match="v2, Mistral-7B-v0.2"):
        load_tokenizer(mistral_common_file("mistral_instruct_tokenizer_240216.model.v2"))


def test_v3_system_prompt_and_tools_join_the_last_user_turn(v3):
    c = v3.control
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    ids = encode_prompt(msgs, v3, tools)
    tools_json = '[{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]'
    assert ids == ([1, c["[INST]"], *v3.encode("U1"), c["[/INST]"], *v3.encode("A1"), 2, c["[AVAILABLE_TOOLS]"],
                    *v3.encode(tools_json), c["[/AVAILABLE_TOOLS]"], c["[INST]"], *v3.encode("S\n\nU2"), c["[/INST]"]])


def test_v3_tool_call_labels(v3):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "abc123XYZ", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "20 °C."}]
    ids, labels = encode_chat(msgs, v3)
    call = [v3.control["[TOOL_CALLS]"], *v3.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]'), 2]
    answer = v3.encode("20 °C.") + [2]
    assert [l for l in labels if l != IGNORE_INDEX] == call + answer
    result = [v3.control["[TOOL_RESULTS]"], *v3.encode('{"content": {"temp": 20}, "call_id": "abc123XYZ"}'),
              v3.control["[/TOOL_RESULTS]"]]
    start = ids.index(result[0])
    assert ids[start:start + len(result)] == result and set(labels[start:start + len(result)]) == {IGNORE_INDEX}


def test_tools_with_the_v1_tokenizer_are_refused_in_one_line(tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ChatFormatError, match="tools need a v3 tokenizer"):
        encode_chat(msgs, tokenizer, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


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
        ([{"role": "assistant", "content": "x"}], "a one-message conversation is a system or user turn"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"},
          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "message 2: role 'system' cannot follow 'assistant'"),
        ([{"role": "user", "content": "a"}], "last message must be an assistant"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "message 1 (assistant): empty content"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}], "content must be a string"),
        ([{"role": "bot", "content": "a"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"},
          {"role": "assistant", "content": "b"}], "tool calls need a v3 tokenizer"),
    ],
)
def test_invalid_conversations_are_named(messages, needle, tokenizer):
    """Each is refused by mistral_common too (no chat mistral_common encodes is refused here)."""
    with pytest.raises(ChatFormatError) as err:
        encode_chat(messages, tokenizer)
    assert needle in str(err.value)
    if messages:
        with pytest.raises(Exception):  # noqa: B017 - mistral_common's exception types vary
            _reference(messages, ValidationMode.finetuning)


def test_prompt_must_not_end_with_an_answer(tokenizer):
    with pytest.raises(ChatFormatError, match="last message must be a user"):
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
