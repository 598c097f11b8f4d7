"""Mistral chat encoding with training labels, v1 (Mixtral-8x7B) and v3 (Mixtral-8x22B, tool calls).

Exactly what mistral_common's `InstructTokenizerV1` / `InstructTokenizerV3` produce, token for token, for
every chat mistral_common accepts (tests/unit/test_chat.py checks ≥ 500 generated chats per version against
mistral_common itself). The version is the tokenizer's (`data/tokenizer.py`: read from the file).

First the chat is normalized as mistral_common normalizes it (`normalize`):
    system prompt   every non-empty system message's text, joined with "\\n\\n"
    turns           consecutive messages of one role merge (text joined with "\\n\\n", tool calls appended;
                    system messages drop out but still separate turns); tool messages stay one by one;
                    a chat that starts with anything but a user turn gets an empty user turn first
Then each turn is encoded (enc = sentencepiece, no BOS/EOS, each piece of text on its own):

    v1  <s> enc("[INST] {system}\\n\\n{user_1} [/INST]") enc(assistant_1) </s> enc("[INST] {user_2} [/INST]") ...
        ("[INST]" is text; the system prompt joins the *first* user turn; no tools)
    v3  <s> [INST] enc(user_1) [/INST] enc(assistant_1.rstrip(" ")) </s> ...
            [AVAILABLE_TOOLS] enc(json(tools)) [/AVAILABLE_TOOLS] [INST] enc("{system}\\n\\n{user_n}") [/INST]
            [TOOL_CALLS] enc(json([{"name", "arguments", "id"}])) </s>
            [TOOL_RESULTS] enc(json({"content", "call_id"})) [/TOOL_RESULTS] ...
        (control tokens by id; the system prompt and the tools join the *last* user turn; json is
        `json.dumps(..., ensure_ascii=False)`, arguments and tool results parsed as JSON when they are JSON)

Text is always text: "<s>", "</s>", "[INST]" typed in a message are encoded as the characters they are, as
mistral_common does (an HF chat template cannot do this: see data/hf_tokenizer.py).

Labels are -100 everywhere except each assistant turn's tokens (its answer or its [TOOL_CALLS] block) and
its `</s>`. Labels are *unshifted* (labels[i] is the target of position i); the loss shifts them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# mistral_common's validator: which role may follow which
FOLLOWS = {"system": {"user", "assistant", "system"}, "user": {"assistant", "system", "user"},
           "assistant": {"assistant", "user", "tool"}, "tool": {"assistant", "tool", "user"}}
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
NULL_ID = "null"


class ChatFormatError(ValueError):
    """A conversation that cannot be encoded; the message says what is wrong and where."""


def _calls(m: dict) -> list:
    return m.get("tool_calls") or []


def _check_message(i: int, m, version: str) -> None:
    if not isinstance(m, dict) or "role" not in m:
        raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.200}")
    role = m["role"]
    if role not in ROLES:
        raise ChatFormatError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
    if version == "v1" and (role == "tool" or _calls(m)):
        raise ChatFormatError(f"message {i} ({role}): tool calls need a v3 tokenizer (Mixtral-8x22B's); "
                              f"the v1 tokenizer has no tool tokens")
    content = m.get("content")
    if role == "assistant" and _calls(m):
        if content:
            raise ChatFormatError(f"message {i} (assistant): has both content and tool_calls (one or the other)")
        if not isinstance(m["tool_calls"], list):
            raise ChatFormatError(f"message {i} (assistant): tool_calls must be a list")
        for j, call in enumerate(m["tool_calls"]):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
                raise ChatFormatError(f"message {i} (assistant): tool_calls[{j}] needs function.name matching "
                                      f"{NAME.pattern}, got {call!r:.200}")
            if not isinstance(fn.get("arguments", ""), (str, dict)):
                raise ChatFormatError(f"message {i} (assistant): tool_calls[{j}].function.arguments must be a "
                                      f"JSON string or an object")
        return
    if "content" not in m:
        raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.200}")
    if not isinstance(content, str):
        raise ChatFormatError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
    if role == "assistant" and content == "":
        raise ChatFormatError(f"message {i} (assistant): empty content and no tool_calls")
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str) or not CALL_ID.match(m["tool_call_id"]):
            raise ChatFormatError(f"message {i} (tool): tool_call_id must be 9 letters or digits (v3), "
                                  f"got {m.get('tool_call_id')!r}")
        if m.get("name") is not None and not NAME.match(str(m["name"])):
            raise ChatFormatError(f"message {i} (tool): name must match {NAME.pattern}, got {m['name']!r}")


def _check_tools(tools, version: str) -> None:
    if not tools:
        return
    if version == "v1":
        raise ChatFormatError("tools need a v3 tokenizer (Mixtral-8x22B's); the v1 tokenizer has no tool tokens")
    if not isinstance(tools, list):
        raise ChatFormatError(f"tools must be a list, got {type(tools).__name__}")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function" or not NAME.match(str(fn.get("name"))):
            raise ChatFormatError(f"tools[{j}]: expected {{'type': 'function', 'function': {{'name', 'description', "
                                  f"'parameters'}}}} with a name matching {NAME.pattern}, got {t!r:.200}")


def validate_messages(messages: Sequence[dict], *, for_training: bool, version: str = "v1", tools=None) -> None:
    """Refuse what mistral_common refuses. Raises ChatFormatError naming the offending message.

    Roles follow each other as mistral_common allows (`FOLLOWS`); for training it ends with an assistant turn, as a prompt with a user or tool turn; every assistant's
    tool calls are answered by that many tool messages before the next assistant turn.
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ChatFormatError("empty conversation: expected a non-empty list of messages")
    _check_tools(tools, version)
    for i, m in enumerate(messages):
        _check_message(i, m, version)
    if len(messages) == 1 and messages[0]["role"] not in ("system", "user"):
        raise ChatFormatError(f"message 0: a one-message conversation is a system or user turn, got "
                              f"{messages[0]['role']!r}")
    for i in range(1, len(messages)):
        prev, role = messages[i - 1]["role"], messages[i]["role"]
        if role not in FOLLOWS[prev]:
            raise ChatFormatError(f"message {i}: role {role!r} cannot follow {prev!r}")
    last = messages[-1]["role"]
    if for_training and last != "assistant":
        raise ChatFormatError(f"last message must be an assistant answer for training, got {last!r}")
    if not for_training and last == "assistant":
        raise ChatFormatError("last message must be a user (or tool) turn for a prompt, got 'assistant'")
    pending = 0  # tool results still owed (negative: more results than calls); counted as mistral_common does
    for i, m in enumerate(messages[1:], start=1):  # a first message is never counted (as in mistral_common)
        if m["role"] == "tool":
            pending -= 1
        elif m["role"] == "assistant":
            if pending:
                raise ChatFormatError(f"message {i}: the tool results before it do not match the previous "
                                      f"assistant turn's tool calls ({-pending:+d})")
            pending = len(_calls(m))
            for j, call in enumerate(_calls(m)):
                cid = call.get("id", NULL_ID)
                if cid == NULL_ID and for_training and i == len(messages) - 1:
                    continue  # the final answer's call may have no id (mistral_common's finetuning rule)
                if not isinstance(cid, str) or not CALL_ID.match(cid):
                    raise ChatFormatError(f"message {i} (assistant): tool_calls[{j}].id must be 9 letters or "
                                          f"digits (v3), got {cid!r}")
    if for_training and pending < 0:
        raise ChatFormatError("more tool results than the last assistant turn's tool calls")


def _json(text) -> object:
    """mistral_common's reading of arguments and tool results: parsed when JSON, "" as {}, else the text."""
    if isinstance(text, dict):
        return text
    if text is None or text == "":
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def normalize(messages: Sequence[dict]) -> tuple[str | None, list[dict]]:
    """(system prompt, turns) as mistral_common's InstructRequestNormalizer makes them (see the module doc)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"]) or None
    turns: list[dict] = []
    group: list[dict] = []

    def flush():
        if not group:
            return
        role = group[0]["role"]
        if role == "tool":
            turns.extend({"role": "tool", "content": m.get("content"), "tool_call_id": m["tool_call_id"]} for m in group)
        elif role in ("user", "assistant"):
            text = "\n\n".join(m["content"] for m in group if m.get("content"))
            calls = [c for m in group for c in _calls(m)]
            if text and calls:
                raise ChatFormatError("consecutive assistant messages merge into one turn (as mistral_common merges "
                                      "them) that would hold both content and tool_calls")
            turns.append({"role": role, "content": text, "tool_calls": calls})
        group.clear()

    for m in messages:
        if group and m["role"] != group[0]["role"]:
            flush()
        group.append(m)
    flush()
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "", "tool_calls": []})
    return system, turns


def _tools_json(tools) -> str:
    """The [AVAILABLE_TOOLS] text: mistral_common's `Tool.model_dump()` of each, in its key order."""
    out = []
    for t in tools:
        fn = t["function"]
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description") or "",
                                                     "parameters": fn.get("parameters") or {}}})
    return _dumps(out)


def _calls_json(calls) -> str:
    out = []
    for c in calls:
        fn = c["function"]
        call = {"name": fn["name"], "arguments": _json(fn.get("arguments"))}
        if c.get("id", NULL_ID) != NULL_ID:
            call["id"] = c["id"]
        out.append(call)
    return _dumps(out)


def _encode(messages: Sequence[dict], tokenizer, tools) -> tuple[list[int], list[int]]:
    system, turns = normalize(messages)
    v3, ctl = tokenizer.version == "v3", tokenizer.control
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    first_user, last_user = users[0], users[-1]
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]

    def prompt(part):
        ids.extend(part)
        labels.extend([IGNORE_INDEX] * len(part))

    for i, t in enumerate(turns):
        if t["role"] == "user" and not v3:
            text = system + "\n\n" + t["content"] if i == first_user and system else t["content"]
            prompt(tokenizer.encode(f"[INST] {text} [/INST]"))
        elif t["role"] == "user":
            if i == last_user and tools:
                prompt([ctl["[AVAILABLE_TOOLS]"], *tokenizer.encode(_tools_json(tools)), ctl["[/AVAILABLE_TOOLS]"]])
            text = system + "\n\n" + t["content"] if i == last_user and system else t["content"]
            prompt([ctl["[INST]"], *tokenizer.encode(text), ctl["[/INST]"]])
        elif t["role"] == "tool":
            result = _dumps({"content": _json(t["content"]), "call_id": t["tool_call_id"]})
            prompt([ctl["[TOOL_RESULTS]"], *tokenizer.encode(result), ctl["[/TOOL_RESULTS]"]])
        else:
            answer = ([ctl["[TOOL_CALLS]"], *tokenizer.encode(_calls_json(t["tool_calls"])), tokenizer.eos_id]
                      if t["tool_calls"] else encode_answer(t["content"], tokenizer))
            ids.extend(answer)
            labels.extend(answer)
    return ids, labels


def encode_answer(text: str, tokenizer) -> list[int]:
    """An assistant answer's tokens and its </s> (v3 drops trailing spaces, as mistral_common does)."""
    return tokenizer.encode(text.rstrip(" ") if tokenizer.version == "v3" else text) + [tokenizer.eos_id]


def encode_chat(messages: Sequence[dict], tokenizer, tools=None) -> tuple[list[int], list[int]]:
    """Encode a training conversation.

    Args:
        messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...] ending with an
            assistant turn; v3 also takes assistant `tool_calls` ([{"id", "function": {"name", "arguments"}}])
            and tool messages ({"role": "tool", "tool_call_id", "content"}), OpenAI's shapes.
        tokenizer: from `data.tokenizer.load_tokenizer` (its `version` picks the scheme).
        tools: OpenAI-style tool definitions ([{"type": "function", "function": {...}}]), v3 only.
    Returns:
        (input_ids, labels), both of length T; labels are -100 except assistant tokens and their </s>.
    """
    validate_messages(messages, for_training=True, version=tokenizer.version, tools=tools)
    return _encode(messages, tokenizer, tools)


def encode_prompt(messages: Sequence[dict], tokenizer, tools=None) -> list[int]:
    """Encode a conversation ending with a user (or tool) turn, ready for the model to answer."""
    validate_messages(messages, for_training=False, version=tokenizer.version, tools=tools)
    return _encode(messages, tokenizer, tools)[0]
