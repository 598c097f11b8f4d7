"""Format adapters → canonical records; every bad record is named by file and line."""

import gzip
import json

import pytest

from data.formats import canonical, hh_prompt_messages, split_hh_transcript
from data.readers import RecordError, read_records


def _one(tmp_path, name, content, kind, fmt="auto"):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return [canonical(r, fmt, kind) for r in read_records(str(p))]


def test_alpaca_sharegpt_messages_to_canonical(tmp_path):
    alpaca = _one(tmp_path, "a.json", json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"}]), "messages")
    assert alpaca[0]["messages"] == [{"role": "user", "content": "Add\n1 and 2"}, {"role": "assistant", "content": "3"}]
    share = _one(tmp_path, "s.jsonl", json.dumps({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}), "messages")
    assert [m["role"] for m in share[0]["messages"]] == ["system", "user", "assistant"]
    text = _one(tmp_path, "t.txt", "\ufeffplain document", "text")
    assert text == [{"text": "plain document"}]


def test_hh_rlhf_split_and_prompt():
    prompt, ans = split_hh_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao")
    assert ans == "ciao"
    assert hh_prompt_messages(prompt) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                          {"role": "user", "content": "bye"}]


def test_real_hh_rlhf_and_dpo_demo(shared_data):
    recs = list(read_records(str(shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz")))
    assert len(recs) == 2312
    ok = bad = 0
    for r in recs[:300]:
        try:
            c = canonical(r, "auto", "preference")
            assert c["prompt"][-1]["role"] == "user" and c["chosen"] != c["rejected"]
            ok += 1
        except RecordError as e:
            assert e.kind in ("identical pair", "prompts differ", "invalid conversation", "empty content")
            bad += 1
    assert ok > 250
    dpo = [canonical(r, "auto", "preference") for r in read_records(str(shared_data / "llama_factory_demo" / "dpo_en_demo.json"))]
    assert len(dpo) == 300 and all(isinstance(d["chosen"], str) for d in dpo)


@pytest.mark.parametrize("name, content, kind, needle", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "text", "bad.jsonl:2: malformed JSON"),
    ("bad.jsonl", '{"txt": "x"}\n', "text", "bad.jsonl:1: unknown format"),
    ("bad.jsonl", '{"text": 3}\n', "text", "bad.jsonl:1: mistyped field"),
    ("bad.jsonl", '[1, 2]\n', "text", "bad.jsonl:1: not an object"),
    ("bad.jsonl", b'{"text": "caf\xe9"}\n', "text", "bad.jsonl:1: not UTF-8"),
    ("bad.jsonl", "", "text", "empty file"),
    ("bad.jsonl", '{"text": "   "}\n', "text", "empty content"),
    ("bad.jsonl", '{"text": "x", "score": NaN}\n', "text", "non-finite number"),
    ("bad.jsonl", '{"messages": [{"role": "assistant", "content": "x"}]}\n', "messages", "bad.jsonl:1: invalid conversation"),
    ("bad.jsonl", '{"prompt": "q", "chosen": "same", "rejected": "same"}\n', "preference", "identical pair"),
    ("bad.csv", "a,b\n", "text", "unknown format"),
])
def test_bad_records_name_file_and_line(tmp_path, name, content, kind, needle):
    with pytest.raises(RecordError) as err:
        _one(tmp_path, name, content, kind)
    assert needle in str(err.value)


def test_crlf_and_gzip_jsonl(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\r\n{"text": "b"}\r\n'))
    assert [canonical(r, "auto", "text")["text"] for r in read_records(str(p))] == ["a", "b"]


def test_sharegpt_tool_calls_load_and_encode_as_mistral_common_v3(shared_data):
    """LLaMA-Factory's tool-call ShareGPT (function_call / observation turns, "tools" as a JSON string) becomes
    OpenAI's shapes with 9-character call ids, and encodes as mistral_common v3 encodes that chat."""
    from chat_cases import reference
    from data.chat import encode_chat
    from data.tokenizer import load_tokenizer, v3_tokenizer_path

    tok = load_tokenizer(v3_tokenizer_path())
    path = shared_data / "llama_factory_demo" / "glaive_toolcall_en_demo.json"
    records = [canonical(r, "auto", "messages", version="v3") for r in read_records(str(path))]
    with_calls = [r for r in records if any(m.get("tool_calls") for m in r["messages"])]
    assert len(records) == 300 and len(with_calls) > 100 and all(r.get("tools") for r in with_calls)
    again = [canonical(r, "auto", "messages", version="v3") for r in read_records(str(path))]
    assert again == records  # the call ids are the same on every read (the tokenization cache relies on it)
    for r in records[:120]:
        assert list(encode_chat(r["messages"], tok, r.get("tools"))) == \
            list(reference(r["messages"], v3_tokenizer_path(), for_training=True, tools=r.get("tools")))


def test_tools_with_a_v1_tokenizer_name_the_file_and_line(shared_data):
    path = shared_data / "llama_factory_demo" / "glaive_toolcall_en_demo.json"
    with pytest.raises(RecordError) as err:
        for r in read_records(str(path)):
            canonical(r, "auto", "messages", version="v1")
    assert err.value.kind == "invalid conversation" and "glaive_toolcall_en_demo.json" in str(err.value)
    assert "v3 tokenizer" in str(err.value) and str(err.value).count("\n") == 0
