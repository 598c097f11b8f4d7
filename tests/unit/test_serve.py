"""eval/serve.py over real HTTP with the official `openai` client: OpenAI's wire format for chat (streamed
and not), completions and models; every malformed request a 4xx with OpenAI's error JSON before any stream;
stop sequences; 16 concurrent clients all answered."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import BadRequestError, OpenAI

from eval.generate import generate, load
from test_eval import _save_tiny


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from eval.serve import start_server

    run = tmp_path_factory.mktemp("serve") / "my-run"
    (run / "hf").mkdir(parents=True)
    model, tok = load(_save_tiny(run / "hf", seed=4, max_position_embeddings=256))
    from eval.serve import default_model_id

    server = start_server(model, tok, default_model_id(str(run / "hf")), "127.0.0.1", 0, max_new_tokens=16)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, model, tok
    server.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": ""}, {"role": "user", "content": "Name three colours."}]


def test_models_chat_stream_and_completions(served, client):
    url, model, tok = served
    assert [m.id for m in client.models.list().data] == ["my-run"]  # the run's name, not "hf"
    r = client.chat.completions.create(model="my-run", messages=CHAT, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "my-run" and r.choices[0].message.role == "assistant"
    # the same greedy answer as eval/generate.py, and the empty system prompt is none (as mistral_common)
    from data.chat import encode_prompt

    prompt = encode_prompt(CHAT[1:], tok)
    expected = generate(model, tok, [prompt], max_new_tokens=12, batch_size=1, progress=False)[0]
    assert r.choices[0].message.content == tok.decode(expected)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    chunks = list(client.chat.completions.create(model="my-run", messages=CHAT, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    c = client.completions.create(model="my-run", prompt="The capital of France is", max_tokens=8)
    raw = generate(model, tok, [[tok.bos_id] + tok.encode("The capital of France is")], max_new_tokens=8,
                   batch_size=1, progress=False)[0]
    assert c.object == "text_completion" and c.choices[0].text == tok.decode(raw)
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model="my-run", prompt="The capital of France is", max_tokens=8, stream=True))
    assert streamed == c.choices[0].text


def test_stop_sequences_end_the_answer(client):
    full = client.chat.completions.create(model="my-run", messages=CHAT, max_tokens=16).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:6]
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model="my-run", messages=CHAT, max_tokens=16, stop=[stop, "@@"],
                                                         stream=True))
            text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(model="my-run", messages=CHAT, max_tokens=16, stop=stop)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[:full.find(stop)] and finish == "stop", (stream, text, full, stop)


BAD = [  # (what, body or raw bytes, expected status, text in the error message)
    ("bad JSON", b"{not json", 400, "not valid JSON"),
    ("a JSON list body", b"[1, 2]", 400, "JSON object"),
    ("no messages", {"model": "m"}, 400, "'messages'"),
    ("empty messages", {"messages": []}, 400, "'messages'"),
    ("a message that is not an object", {"messages": ["hi"]}, 400, "messages[0] must be an object"),
    ("an unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("content of the wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("roles out of order", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "system", "content": "c"}, {"role": "user", "content": "d"}]},
     400, "role 'system' cannot follow 'assistant'"),
    ("tools for a v1 model", {"messages": [{"role": "user", "content": "a"}],
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     400, "tools need a v3 tokenizer"),
    ("a tool message for a v1 model", {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "r",
                                                                                         "tool_call_id": "abcdefghi"}]},
     400, "tool calls need a v3 tokenizer"),
    ("tool_choice required", {"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"}, 400,
     "'tool_choice'"),
    ("ending with the assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "last message must be a user"),
    ("max_tokens -1", {"messages": [{"role": "user", "content": "a"}], "max_tokens": -1}, 400, "'max_tokens'"),
    ("max_tokens absurd", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 10**9}, 400, "'max_tokens'"),
    ("max_tokens a string", {"messages": [{"role": "user", "content": "a"}], "max_tokens": "5"}, 400, "integer"),
    ("n=2", {"messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "only n=1"),
    ("temperature 5", {"messages": [{"role": "user", "content": "a"}], "temperature": 5}, 400, "'temperature'"),
    ("stop of the wrong type", {"messages": [{"role": "user", "content": "a"}], "stop": 3}, 400, "'stop'"),
    ("five stop sequences", {"messages": [{"role": "user", "content": "a"}], "stop": list("abcde")}, 400, "'stop'"),
    ("stream not a bool", {"messages": [{"role": "user", "content": "a"}], "stream": "yes"}, 400, "'stream'"),
    ("an over-long prompt", {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context"),
    ("an oversized body", {"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}, 413, "exceeds"),
    ("a completion without prompt", {"max_tokens": 3}, 400, "'prompt'"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_every_bad_request_is_a_4xx_with_openai_error_json(served, stream):
    url = served[0]
    for what, body, status, needle in BAD:
        path = "/v1/completions" if "completion" in what else "/v1/chat/completions"
        if isinstance(body, dict) and stream:
            body = {**body, "stream": True} if "stream" not in body else body
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=120)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json"), (what, r.headers["content-type"])
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", (what, err)
    r = httpx.get(url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_the_openai_client_sees_a_bad_streaming_request_as_an_error(client):
    with pytest.raises(BadRequestError, match="one-message conversation"):
        list(client.chat.completions.create(model="my-run", messages=[{"role": "assistant", "content": "x"}],
                                            max_tokens=2, stream=True))


def test_sixteen_concurrent_clients_are_all_answered(served, client):
    def ask(i):
        return client.chat.completions.create(model="my-run", max_tokens=4, stream=i % 2 == 1,
                                              messages=[{"role": "user", "content": f"Count to {i}."}])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16
    for i, a in enumerate(answers):
        if i % 2:
            assert list(a)[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert a.choices[0].finish_reason in ("stop", "length")
    assert client.models.list().data[0].id == "my-run"  # alive after
