"""An OpenAI-compatible HTTP server for an HF Mixtral folder, with the [INST] template.

    python eval/serve.py model_path=outputs/sft/hf port=8000          # binds 127.0.0.1 unless host= is given

Endpoints: GET /v1/models; POST /v1/chat/completions (non-streaming, and streaming as server-sent
events when "stream": true). Any OpenAI client can talk to a trained model, and the MT-Bench judge
path can be tested against a real server. One request generates at a time (a lock); the stdlib
ThreadingHTTPServer keeps the others waiting, not refused.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from data.chat import ChatFormatError, encode_prompt
from eval.config import CONFIG_DIR, ServeConfig, validate_eval
from train import cli


class _Streamer:
    """transformers streamer: receives new token ids during `generate` and queues them."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.skip_prompt = True

    def put(self, value):
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self):
        self.q.put(None)


class ChatServer:
    def __init__(self, model, tokenizer, model_id: str, max_new_tokens: int = 512):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def _prompt(self, body: dict) -> tuple[list[int], int, float]:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
        ids = encode_prompt(msgs, self.tokenizer)
        max_new = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.max_new_tokens)
        room = self.model.config.max_position_embeddings - len(ids)
        if room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the context of {self.model.config.max_position_embeddings}")
        return ids, max(1, min(max_new, room)), float(body.get("temperature", 0.0) or 0.0)

    def _generate_kwargs(self, ids: list[int], max_new: int, temperature: float) -> dict:
        return dict(input_ids=torch.tensor([ids], device=self.model.device), max_new_tokens=max_new,
                    do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=None,
                    top_k=None, eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id, use_cache=True)

    def complete(self, body: dict) -> dict:
        ids, max_new, temperature = self._prompt(body)
        with self.lock, torch.no_grad():
            out = self.model.generate(**self._generate_kwargs(ids, max_new, temperature))[0, len(ids):].tolist()
        finish = "stop" if self.tokenizer.eos_id in out else "length"
        if self.tokenizer.eos_id in out:
            out = out[:out.index(self.tokenizer.eos_id)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.tokenizer.decode(out)},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}}

    def stream(self, body: dict):
        """Yields chat.completion.chunk dicts as tokens are produced."""
        ids, max_new, temperature = self._prompt(body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        with self.lock:
            streamer = _Streamer()
            kwargs = self._generate_kwargs(ids, max_new, temperature)
            worker = threading.Thread(target=lambda: self._run(kwargs, streamer), daemon=True)
            worker.start()
            got, sent, finish = [], "", "length"
            while (new := streamer.q.get()) is not None:
                if self.tokenizer.eos_id in new:
                    new = new[:new.index(self.tokenizer.eos_id)]
                    finish = "stop"
                got += new
                text = self.tokenizer.decode(got)
                if len(text) > len(sent) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                    yield chunk({"content": text[len(sent):]})
                    sent = text
                if finish == "stop":
                    break
            worker.join()
        yield chunk({}, finish)

    def _run(self, kwargs, streamer):
        with torch.no_grad():
            self.model.generate(**kwargs, streamer=streamer)
        streamer.end()


def make_handler(server: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; errors are answered in JSON
            pass

        def _json(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str):
            self._json(code, {"error": {"message": message, "type": "invalid_request_error" if code < 500 else "server_error"}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                                               "created": 0, "owned_by": "mixtral-tune"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not body.get("stream"):
                    return self._json(200, server.complete(body))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for c in server.stream(body):
                    self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
            except (ValueError, ChatFormatError, json.JSONDecodeError) as e:
                self._error(400, str(e))
            except Exception as e:  # noqa: BLE001 - answer the client, keep serving
                self._error(500, f"{type(e).__name__}: {e}")

    return Handler


def start_server(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 max_new_tokens: int = 512) -> ThreadingHTTPServer:
    """Start serving in a background thread; returns the server (`.server_address`, `.shutdown()`)."""
    httpd = ThreadingHTTPServer((host, port), make_handler(ChatServer(model, tokenizer, model_id, max_new_tokens)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@cli.main("serve", ServeConfig, validate_eval)
def main(cfg) -> None:
    from eval.generate import load

    model, tokenizer = load(cfg.model_path, cfg.dtype)
    model_id = cfg.model_id or Path(str(cfg.model_path)).resolve().name
    httpd = ThreadingHTTPServer((cfg.host, cfg.port), make_handler(ChatServer(model, tokenizer, model_id, cfg.max_new_tokens)))
    print(f"serving {model_id} at http://{cfg.host}:{httpd.server_address[1]}/v1 (Ctrl-C to stop)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
