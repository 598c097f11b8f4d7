"""Adapting each input format to one canonical form (the records come from data/readers.py).

Canonical forms:
    text        {"text": str}                                         (pretraining)
    messages    {"messages": [{"role", "content"}, ...]}              (SFT)
    preference  {"prompt": [messages ending with user], "chosen": str, "rejected": str}   (DPO)
    unpaired    {"prompt": [messages ending with user], "completion": str, "label": bool}  (KTO; a preference
                pair gives two: chosen → label true, rejected → label false, `unpair`)

Input formats (`data.format`, or "auto" to detect from the first record's keys):
    text        {"text": ...} (field name configurable); .txt files are one document each
    messages    {"messages": [{"role": "system|user|assistant|tool", "content": ...}], "tools": [...]}
                (OpenAI's shapes: assistant "tool_calls", tool "tool_call_id"; tools need a v3 tokenizer)
    alpaca      {"instruction", "input", "output"} (+ optional "system")
    sharegpt    {"conversations": [{"from": "system|human|gpt", "value": ...}]}
                (with "chosen"/"rejected" turns it is a preference pair, LLaMA-Factory style; LLaMA-Factory's
                tool turns "function_call" / "observation" and its "tools" become OpenAI's shapes, `_sharegpt_turns`)
    preference  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
    hh_rlhf     {"chosen": transcript, "rejected": transcript} ("\\n\\nHuman: ...\\n\\nAssistant: ...")
    unpaired    {"prompt": str | messages, "completion": str | messages, "label": bool}  (TRL's unpaired preference)

Every error names the source file and line (or record index) — `RecordError`.
"""

from __future__ import annotations

import hashlib
import json

from data.chat import ChatFormatError, validate_messages
from data.readers import Record, RecordError

def detect_format(value: dict, text_field: str = "text") -> str:
    keys = set(value)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"chosen", "rejected"} <= keys:
        return "preference" if "prompt" in keys else (
            "hh_rlhf" if isinstance(value["chosen"], str) else "preference")
    if text_field in keys:
        return "text"
    raise ValueError(f"cannot tell the format from keys {sorted(keys)}; set data.format")


def _require(value: dict, key: str, kind, where: str):
    if key not in value:
        raise RecordError(where, "missing field", f"no {key!r} field (keys: {sorted(value)})")
    v = value[key]
    if not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(where, "mistyped field", f"{key!r} should be {names}, got {type(v).__name__}")
    return v


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool"}
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def call_id(where: str, k: int) -> str:
    """A tool-call id as v3 wants it (9 letters or digits), the same for the same record and call every time."""
    digest = hashlib.sha256(f"{where}#{k}".encode()).digest()
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(alphabet[b % len(alphabet)] for b in digest[:9])


def _sharegpt_calls(value: str, where: str, j: int, first_id: int) -> list[dict]:
    """A "function_call" turn's value ({"name", "arguments"} or a list of them) as OpenAI tool_calls."""
    try:
        calls = json.loads(value)
    except (json.JSONDecodeError, TypeError):
        raise RecordError(where, "invalid tool call", f"conversations[{j}] (function_call) is not JSON: {value!r:.200}") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise RecordError(where, "invalid tool call", f"conversations[{j}] (function_call) needs {{'name', 'arguments'}}")
    return [{"id": call_id(where, first_id + k), "type": "function",
             "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for k, c in enumerate(calls)]


def _sharegpt_turns(turns, where: str) -> list[dict]:
    """ShareGPT turns as messages; tool calls get ids, and each observation the id of the call it answers."""
    out, open_ids, n_calls = [], [], 0
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RecordError(where, "mistyped field", f"conversations[{j}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise RecordError(where, "unknown role", f"conversations[{j}].from={t['from']!r} "
                              f"(expected one of {sorted(SHAREGPT_ROLES)})")
        if t["from"] == "function_call":
            calls = _sharegpt_calls(t["value"], where, j, n_calls)
            n_calls += len(calls)
            open_ids = [c["id"] for c in calls]
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
        elif t["from"] == "observation":
            if not open_ids:
                raise RecordError(where, "invalid conversation", f"conversations[{j}]: an observation with no "
                                  f"function_call before it to answer")
            out.append({"role": "tool", "tool_call_id": open_ids.pop(0), "content": t["value"]})
        else:
            out.append({"role": role, "content": t["value"]})
    return out


def _tools(value, where: str) -> list[dict] | None:
    """A record's tools: OpenAI's [{"type": "function", "function": {...}}], or LLaMA-Factory's JSON string
    of bare functions; None when it has none."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(where, "invalid tools", f"'tools' is a string but not JSON: {value!r:.200}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError(where, "invalid tools", f"'tools' should be a list of functions, got {value!r:.200}")
    return [t if "function" in t else {"type": "function", "function": t} for t in value] or None


def _check_chat(messages, where: str, for_training: bool, version: str, tools=None) -> list[dict]:
    try:
        validate_messages(messages, for_training=for_training, version=version, tools=tools)
    except ChatFormatError as e:
        raise RecordError(where, "invalid conversation", str(e)) from None
    return [{k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None} | {"content": m.get("content")} for m in messages]


def _with_tools(out: dict, tools) -> dict:
    return out | {"tools": tools} if tools else out


def to_text(rec: Record, text_field: str = "text") -> dict:
    text = _require(rec.value, text_field, str, rec.where)
    if not text.strip():
        raise RecordError(rec.where, "empty content", f"{text_field!r} is empty")
    return {"text": text}


def to_messages(rec: Record, fmt: str, version: str = "v1") -> dict:
    v, where = rec.value, rec.where
    tools = _tools(v.get("tools"), where) if fmt in ("messages", "sharegpt") else None
    if fmt == "messages":
        msgs = _require(v, "messages", list, where)
    elif fmt == "alpaca":
        instruction = _require(v, "instruction", str, where)
        extra = v.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError(where, "mistyped field", f"'input' should be str, got {type(extra).__name__}")
        output = _require(v, "output", str, where)
        msgs = []
        if v.get("system"):
            msgs.append({"role": "system", "content": v["system"]})
        msgs += [{"role": "user", "content": instruction + ("\n" + extra if extra else "")},
                 {"role": "assistant", "content": output}]
    elif fmt == "sharegpt":
        msgs = _sharegpt_turns(_require(v, "conversations", list, where), where)
        if isinstance(v.get("system"), str) and v["system"] and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": v["system"]}] + msgs
    else:
        raise RecordError(where, "wrong format", f"format {fmt!r} is not a chat format")
    return _with_tools({"messages": _check_chat(msgs, where, True, version, tools)}, tools)


def _as_prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise RecordError(where, "mistyped field", f"prompt should be str or a message list, got {type(value).__name__}")


def _as_answer(value, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "value" in value:          # sharegpt turn
        return value["value"]
    if isinstance(value, dict) and "content" in value:        # one message
        return value["content"]
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return value[-1]["content"]
    raise RecordError(where, "mistyped field", f"{key!r} should be a string, a message, or a message list ending with assistant")


def split_hh_transcript(transcript: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript at the last "\\n\\nAssistant:" into (prompt part, answer)."""
    i = transcript.rfind("\n\nAssistant:")
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' in transcript")
    return transcript[:i], transcript[i + len("\n\nAssistant:"):].strip()


def hh_prompt_messages(prefix: str) -> list[dict]:
    """HH "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c" → [user a, assistant b, user c]."""
    msgs = []
    rest = prefix
    import re

    parts = re.split(r"\n\n(Human|Assistant):", rest)
    # parts = [lead, role1, text1, role2, text2, ...]
    for role, text in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    return msgs


def to_preference(rec: Record, fmt: str, version: str = "v1") -> dict:
    v, where = rec.value, rec.where
    tools = _tools(v.get("tools"), where)
    if fmt == "hh_rlhf":
        chosen_t = _require(v, "chosen", str, where)
        rejected_t = _require(v, "rejected", str, where)
        try:
            p_c, chosen = split_hh_transcript(chosen_t)
            p_r, rejected = split_hh_transcript(rejected_t)
        except ValueError as e:
            raise RecordError(where, "invalid transcript", str(e)) from None
        if p_c != p_r:
            raise RecordError(where, "prompts differ", "chosen and rejected transcripts do not share the prompt")
        prompt = hh_prompt_messages(p_c)
    elif fmt == "sharegpt":
        prompt = _sharegpt_turns(_require(v, "conversations", list, where), where)
        chosen = _as_answer(_require(v, "chosen", (dict, str), where), where, "chosen")
        rejected = _as_answer(_require(v, "rejected", (dict, str), where), where, "rejected")
    elif fmt == "preference":
        if "prompt" in v:
            prompt = _as_prompt(v["prompt"], where)
            chosen = _as_answer(_require(v, "chosen", (str, list, dict), where), where, "chosen")
            rejected = _as_answer(_require(v, "rejected", (str, list, dict), where), where, "rejected")
        else:  # UltraFeedback-binarized: full message lists sharing a prompt
            c = _require(v, "chosen", list, where)
            r = _require(v, "rejected", list, where)
            if c[:-1] != r[:-1]:
                raise RecordError(where, "prompts differ", "chosen and rejected message lists do not share the prompt")
            prompt, chosen, rejected = c[:-1], _as_answer(c, where, "chosen"), _as_answer(r, where, "rejected")
    else:
        raise RecordError(where, "wrong format", f"format {fmt!r} is not a preference format")
    for key, ans in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(ans, str) or not ans:
            raise RecordError(where, "empty content", f"{key} answer is empty")
    if chosen == rejected:
        raise RecordError(where, "identical pair", "chosen and rejected are identical (no preference signal)")
    prompt = _check_chat(prompt, where, False, version, tools)
    return _with_tools({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tools)


def to_unpaired(rec: Record, fmt: str, version: str = "v1") -> dict:
    """An unpaired record (KTO) in canonical form; a preference pair comes out in `to_preference`'s form, for
    `unpair` to split."""
    if fmt != "unpaired":
        return to_preference(rec, fmt, version)
    v, where = rec.value, rec.where
    tools = _tools(v.get("tools"), where)
    prompt = _as_prompt(_require(v, "prompt", (str, list), where), where)
    completion = _as_answer(_require(v, "completion", (str, list, dict), where), where, "completion")
    label = _require(v, "label", bool, where)
    if not isinstance(completion, str) or not completion:
        raise RecordError(where, "empty content", "completion is empty")
    prompt = _check_chat(prompt, where, False, version, tools)
    return _with_tools({"prompt": prompt, "completion": completion, "label": label}, tools)


def unpair(c: dict) -> list[dict]:
    """Canonical unpaired records from one canonical record of either form: a pair gives (prompt, chosen, true)
    and (prompt, rejected, false), next to each other."""
    if "completion" in c:
        return [c]
    extra = {"tools": c["tools"]} if c.get("tools") else {}
    return [{"prompt": c["prompt"], "completion": c[key], "label": key == "chosen", **extra} for key in ("chosen", "rejected")]


def canonical(rec: Record, fmt: str, kind: str, text_field: str = "text", version: str = "v1") -> dict:
    """Adapt one record to the canonical form of `kind` ("text", "messages", "preference", "unpaired"); chats are
    checked against the rules of the tokenizer `version` ("v1" has no tools). For "unpaired" a preference pair
    keeps its pair form (`unpair` splits it)."""
    if fmt == "auto":
        try:
            fmt = detect_format(rec.value, text_field)
        except ValueError as e:
            raise RecordError(rec.where, "unknown format", str(e)) from None
    if kind == "text":
        if fmt in ("messages", "alpaca", "sharegpt"):  # continued pretraining on chats: flatten
            msgs = to_messages(rec, fmt, "v3")["messages"]
            return {"text": "\n\n".join(m["content"] if m["content"] is not None else json.dumps(m["tool_calls"], ensure_ascii=False)
                                      for m in msgs)}
        return to_text(rec, text_field)
    if kind == "messages":
        if fmt == "text":
            raise RecordError(rec.where, "wrong format", "a text record where a chat was expected (set data.format)")
        return to_messages(rec, fmt, version)
    if kind in ("preference", "unpaired"):
        if fmt == "sharegpt" and "chosen" not in rec.value:
            raise RecordError(rec.where, "missing field", "sharegpt record without 'chosen'/'rejected'")
        if fmt == "unpaired" and kind == "preference":
            raise RecordError(rec.where, "wrong format", "an unpaired record (prompt, completion, label) where a "
                              "preference pair was expected: only dpo.loss_type=kto trains on unpaired data")
        return to_unpaired(rec, fmt, version) if kind == "unpaired" else to_preference(rec, fmt, version)
    raise ValueError(f"unknown kind {kind!r}")
