"""Checking an OpenAI-style request before anything is generated (eval/serve.py): every malformed request is a
`BadRequest` with OpenAI's error JSON, naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from data.chat import ChatFormatError, encode_prompt

MAX_BODY_BYTES = 4 * 2**20
ROLES = ("system", "user", "assistant", "tool")


class BadRequest(ValueError):
    """A request the server refuses: OpenAI's error JSON with this status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A checked request: prompt ids and how to generate."""
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    seed: int | None = None
    completion_tokens: int = 0
    tools: bool = False                   # the request offered tools: an answer may be tool calls
    tool_calls: list | None = None        # the answer's tool calls, in OpenAI's shape (eval/serve.py)


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:50]}", key)
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo:g} and {hi:g}, got {value}", key)
    return value


def _content(m: dict, i: int) -> str | None:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts (None: an assistant's
    tool calls without text)."""
    content = m.get("content")
    if content is None and m.get("role") == "assistant" and m.get("tool_calls"):
        return None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)", f"messages[{i}].content")
    return content


def check_request(body, chat: bool, tokenizer, context: int, max_new_tokens: int) -> Job:
    """The `Job` a request body asks for (a chat completion when `chat`, else a text completion) for a model of
    `context` positions, or `BadRequest` naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
            if m.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                                 f"{json.dumps(m.get('role'))[:40]}", f"messages[{i}].role")
            msgs.append({k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k) is not None}
                        | {"role": m["role"], "content": _content(m, i)})
        tools = body.get("tools") or None
        if body.get("tool_choice") not in (None, "auto", "none"):
            raise BadRequest("'tool_choice' must be \"auto\" or \"none\" (the model decides whether to call a tool)",
                             "tool_choice")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise BadRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
        if body.get("tool_choice") == "none":
            tools = None
        try:
            ids = encode_prompt(msgs, tokenizer, tools)
        except ChatFormatError as e:
            raise BadRequest(str(e), "tools" if str(e).startswith("tools") else "messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise BadRequest(f"only n=1 is supported, got {json.dumps(n)[:40]}", "n")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", "stream")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("'model' must be a string", "model")
    room = context - len(ids)
    if room < 1:
        raise BadRequest(f"the prompt has {len(ids)} tokens; this model's context is {context} tokens",
                         "messages" if chat else "prompt", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _number(body, key, min(max_new_tokens, room), 1, context, integer=True)
    if max_new > room:
        raise BadRequest(f"'{key}'={max_new} plus the prompt's {len(ids)} tokens exceed the context of "
                         f"{context} tokens", key, "context_length_exceeded")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    return Job(ids, max_new, float(_number(body, "temperature", 0.0, 0.0, 2.0)),
               float(_number(body, "top_p", 1.0, 1e-9, 1.0)), stop, body.get("stream", False), seed,
               tools=bool(chat and tokenizer.version == "v3" and body.get("tools") and body.get("tool_choice") != "none"))
