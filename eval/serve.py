"""An OpenAI-compatible HTTP server for an HF Mixtral folder (FastAPI + uvicorn), with the model's chat format.

    python eval/serve.py model_path=outputs/sft/hf port=8000          # binds 127.0.0.1 unless host= is given

Endpoints, in OpenAI's wire format (tests use the official `openai` client):

    GET  /v1/models             the one model, named `model_id` (default: the run's name, e.g. "sft" for outputs/sft/hf),
                                with its context in tokens (`max_model_len`, as vLLM reports it)
    POST /v1/chat/completions   messages → prompt as mistral_common encodes it (data/chat.py, v1 or v3 by the
                                folder's tokenizer); "stream": true sends server-sent events. A v3 model takes
                                `tools` (and assistant `tool_calls`, `tool` messages): an answer that starts with
                                [TOOL_CALLS] is returned as `message.tool_calls` (finish_reason "tool_calls"; when
                                streamed, one delta with the whole calls). A v1 model refuses `tools` with a 400.
    POST /v1/completions        a raw text prompt (BOS + sentencepiece), for base models; streaming too

Every request is checked before anything is generated or any stream starts, so a malformed one gets a 4xx
and OpenAI's error JSON ({"error": {"message", "type", "param", "code"}}): bad JSON, a body or message that
is not an object, unknown roles, roles out of order, wrong types, `max_tokens` < 1 or beyond the context,
`n` ≠ 1, a prompt longer than the context (code `context_length_exceeded`), a body over 4 MiB (413).
`stop` (a string or up to 4) ends the answer before the first stop sequence (finish_reason "stop").
One generation runs at a time; concurrent requests queue (uvicorn's thread pool) and are all answered.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path

import torch
from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from eval.config import ServeConfig, validate_eval
from eval.request_checks import MAX_BODY_BYTES, BadRequest, Job, check_request
from train import cli

class Generator:
    """The model behind the endpoints: request checking and (locked) generation."""

    def __init__(self, model, tokenizer, model_id: str, max_new_tokens: int = 512):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_new_tokens = max_new_tokens
        self.context = int(model.config.max_position_embeddings)
        self.lock = threading.Lock()

    # ---- checking ------------------------------------------------------------------------------
    def job(self, body, chat: bool) -> Job:
        return check_request(body, chat, self.tokenizer, self.context, self.max_new_tokens)

    # ---- generating ----------------------------------------------------------------------------
    def tokens(self, job: Job):
        """Yields the new token ids one at a time (greedy or sampled with the KV cache), holding the lock."""
        with self.lock, torch.no_grad():
            if job.seed is not None:
                torch.manual_seed(job.seed)
            ids = torch.tensor([job.ids], device=self.model.device)
            past, step_ids = None, ids
            for _ in range(job.max_new):
                out = self.model(input_ids=step_ids, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1].float()
                if job.temperature > 0:
                    probs = torch.softmax(logits / job.temperature, dim=-1)
                    if job.top_p < 1.0:
                        sorted_p, order = probs.sort(descending=True)
                        keep = sorted_p.cumsum(0) - sorted_p < job.top_p
                        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                    token = int(torch.multinomial(probs / probs.sum(), 1))
                else:
                    token = int(logits.argmax())
                if token == self.tokenizer.eos_id:
                    return
                yield token
                step_ids = torch.tensor([[token]], device=self.model.device)

    def pieces(self, job: Job):
        """Yields (new text, None) as text becomes final — whole UTF-8 characters, never the start of a stop
        sequence that may still complete — then ("", finish_reason): "stop" at </s> or a stop sequence,
        "length" at max_tokens. Sets `job.completion_tokens`."""
        got, sent, text, finish = [], "", "", None
        hold = max((len(s) for s in job.stop), default=1) - 1
        tokens = self.tokens(job)
        try:
            for token in tokens:
                if not got and job.tools and token == self.tokenizer.control.get("[TOOL_CALLS]"):
                    rest = list(tokens)  # the calls' JSON, up to </s>
                    job.completion_tokens = 1 + len(rest)
                    job.tool_calls = tool_calls(self.tokenizer.decode(rest), job.ids)
                    if job.tool_calls is not None:
                        yield "", "tool_calls"
                        return
                    got = rest  # not the JSON of tool calls: the text is the answer
                    text = self.tokenizer.decode(got)
                    break
                got.append(token)
                text = self.tokenizer.decode(got)
                cut = min((text.find(s) for s in job.stop if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                ready = text[:len(text) - hold] if hold else text
                if len(ready) > len(sent) and not ready.endswith("\ufffd"):
                    yield ready[len(sent):], None
                    sent = ready
        finally:
            tokens.close()  # releases the lock when a stop sequence ends the answer early
        job.completion_tokens = len(got)
        if len(text) > len(sent):
            yield text[len(sent):], None
        yield "", finish or ("stop" if len(got) < job.max_new else "length")


def tool_calls(text: str, prompt: list[int]) -> list[dict] | None:
    """The model's [TOOL_CALLS] JSON (v3: [{"name", "arguments", "id"?}]) in OpenAI's shape, or None when it is
    not such JSON. A call without an id gets one (9 letters or digits, as v3 wants), derived from the prompt."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    out = []
    for k, c in enumerate(calls):
        args = c.get("arguments", {})
        digest = hashlib.sha256(f"{prompt}#{k}".encode()).hexdigest()
        out.append({"id": c["id"] if isinstance(c.get("id"), str) else digest[:9], "type": "function",
                    "function": {"name": c["name"],
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return out


def _chunk(kind: str, cid: str, created: int, model: str, text: str | None, finish, role: bool = False,
           calls: list | None = None) -> dict:
    if kind == "chat":
        delta = ({"role": "assistant", "content": ""} if role else {"content": text} if text else {})
        if calls:
            delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}


def build_app(gen: Generator):
    """The FastAPI application over a `Generator`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mixtral-tune", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: BadRequest) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404 / 405 in OpenAI's shape
        return error(BadRequest(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(BadRequest(str(exc)))

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # never expected: answer in JSON and keep serving
        return JSONResponse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": gen.model_id, "object": "model", "created": 0,
                                             "owned_by": "mixtral-tune", "max_model_len": gen.context}]}

    async def body_of(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None

    async def serve(request: Request, kind: str):
        from starlette.concurrency import run_in_threadpool

        try:
            job = gen.job(await body_of(request), chat=kind == "chat")
        except BadRequest as e:
            return error(e)
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if job.stream:
            def events():
                if kind == "chat":
                    yield f"data: {json.dumps(_chunk(kind, cid, created, gen.model_id, None, None, role=True))}\n\n"
                for text, finish in gen.pieces(job):
                    if finish == "tool_calls":
                        chunk = _chunk(kind, cid, created, gen.model_id, None, None, calls=job.tool_calls)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if text or finish:
                        yield f"data: {json.dumps(_chunk(kind, cid, created, gen.model_id, text, finish))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        def whole():
            parts = list(gen.pieces(job))
            return "".join(t for t, _ in parts), parts[-1][1], job.completion_tokens

        text, finish, n = await run_in_threadpool(whole)
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}
        if kind == "chat":
            message = ({"role": "assistant", "content": None, "tool_calls": job.tool_calls} if job.tool_calls
                       else {"role": "assistant", "content": text})
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return {"id": cid, "object": "chat.completion", "created": created, "model": gen.model_id,
                    "choices": [choice], "usage": usage}
        return {"id": cid, "object": "text_completion", "created": created, "model": gen.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "completion")

    return app


class Running:
    """A server started in a background thread: `.server_address`, `.shutdown()`."""

    def __init__(self, server, thread):
        self.server, self.thread = server, thread

    @property
    def server_address(self):
        sock = self.server.servers[0].sockets[0]
        return sock.getsockname()[:2]

    def shutdown(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _uvicorn(app, host: str, port: int):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         timeout_keep_alive=30))


def start_server(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 max_new_tokens: int = 512) -> Running:
    """Start serving in a background thread (tests, the MT-Bench judge path); returns once it accepts."""
    server = _uvicorn(build_app(Generator(model, tokenizer, model_id, max_new_tokens)), host, port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    return Running(server, thread)


def default_model_id(model_path: str) -> str:
    """The run's name: `outputs/sft/hf` → "sft"; a hub name or other folder → its last part."""
    path = Path(str(model_path))
    return path.resolve().parent.name if path.name == "hf" and path.is_dir() else path.name


@cli.main("serve", ServeConfig, validate_eval)
def main(cfg) -> None:
    from eval.generate import load

    model, tokenizer = load(cfg.model_path, cfg.dtype)
    model_id = cfg.model_id or default_model_id(cfg.model_path)
    server = _uvicorn(build_app(Generator(model, tokenizer, model_id, cfg.max_new_tokens)), cfg.host, cfg.port)
    print(f"serving {model_id} at http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)", flush=True)
    server.run()


if __name__ == "__main__":
    main()
