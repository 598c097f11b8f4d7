"""Mistral v1 `[INST]` chat encoding with training labels.

Exactly what mistral_common's `InstructTokenizerV1` produces, token for token
(tests/unit/test_chat.py checks it against mistral_common itself):

    <s> enc("[INST] {sys}\\n\\n{user_1} [/INST]") enc("{assistant_1}") </s>
        enc("[INST] {user_2} [/INST]") enc("{assistant_2}") </s> ...

Each message is encoded separately (so each starts with sentencepiece's dummy-prefix
space); the optional system prompt is joined to the first user message with "\\n\\n" (an empty
system prompt is no system prompt, as in mistral_common);
`</s>` follows every assistant answer. "[INST]" is plain text in v1, so a literal
"[INST]" inside a message is encoded as text, never as a control token.

A message containing the strings "<s>", "</s>" or "<unk>" is refused (`CONTROL_STRINGS`):
mistral_common would encode them as text, but every Hugging Face chat template (the export's,
and what vLLM and TGI apply) renders a chat to a string and reads them back as control tokens,
so such a chat would be trained or answered here in a form no server can reproduce.

Labels are -100 everywhere except each assistant answer's tokens and its `</s>`.
Labels are *unshifted* (labels[i] is the target of position i); the loss shifts them.
"""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
CONTROL_STRINGS = ("<s>", "</s>", "<unk>")


class ChatFormatError(ValueError):
    """A conversation that cannot be encoded; the message says what is wrong and where."""


def control_string(text: str) -> str | None:
    """The first of `CONTROL_STRINGS` that occurs in `text`, or None."""
    return next((c for c in CONTROL_STRINGS if c in text), None)


def control_string_problem(text: str) -> str | None:
    """Why `text` cannot be a message (it holds a control-token string), or None."""
    c = control_string(text)
    if c is None:
        return None
    return (f"contains the control-token string {c!r}, which a Hugging Face chat template (the export's, "
            f"vLLM's, TGI's) reads as a control token, not text; remove or escape it")


def validate_messages(messages: Sequence[dict], *, for_training: bool) -> None:
    """Check role order and content. Raises ChatFormatError naming the offending message.

    Valid: optional system message first, then user/assistant strictly alternating starting
    with user. For training the last message is an assistant answer; for a prompt, a user turn.
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ChatFormatError("empty conversation: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.200}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"message {i}: unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i} ({m['role']}): content must be a string, got {type(m['content']).__name__}")
        if m["content"] == "" and m["role"] != "system":  # an empty system prompt is no system prompt
            raise ChatFormatError(f"message {i} ({m['role']}): empty content")
        if m["role"] == "system" and i != 0:
            raise ChatFormatError(f"message {i}: system message must be the first message")
        if (problem := control_string_problem(m["content"])) is not None:
            raise ChatFormatError(f"message {i} ({m['role']}): {problem}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ChatFormatError("conversation has a system message but no user turn")
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            i = j + (len(messages) - len(turns))
            prev = turns[j - 1]["role"] if j else "start"
            raise ChatFormatError(f"message {i}: expected role {expected!r} after {prev!r}, got {m['role']!r}")
    last = turns[-1]["role"]
    if for_training and last != "assistant":
        raise ChatFormatError(f"last message must be an assistant answer for training, got {last!r}")
    if not for_training and last != "user":
        raise ChatFormatError(f"last message must be a user turn for a prompt, got {last!r}")


def _encode(messages: Sequence[dict], tokenizer) -> tuple[list[int], list[int]]:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    input_ids = [tokenizer.bos_id]
    labels = [IGNORE_INDEX]
    first_user = True
    for m in messages:
        if m["role"] == "user":
            content = m["content"]
            if first_user and system:
                content = system + "\n\n" + content
            first_user = False
            ids = tokenizer.encode(f"[INST] {content} [/INST]")
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        elif m["role"] == "assistant":
            ids = tokenizer.encode(m["content"]) + [tokenizer.eos_id]
            input_ids += ids
            labels += ids
    return input_ids, labels


def encode_chat(messages: Sequence[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Encode a training conversation.

    Args:
        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with assistant.
        tokenizer: from `data.tokenizer.load_tokenizer`.
    Returns:
        (input_ids, labels), both of length T; labels are -100 except assistant tokens and their </s>.
    """
    validate_messages(messages, for_training=True)
    return _encode(messages, tokenizer)


def encode_prompt(messages: Sequence[dict], tokenizer) -> list[int]:
    """Encode a conversation ending with a user turn, ready for the model to answer."""
    validate_messages(messages, for_training=False)
    return _encode(messages, tokenizer)[0]
