"""OpenAI-compatible HTTP endpoints over the engine: /v1/chat/completions, /v1/completions (streamed as
server-sent events ending in `data: [DONE]`, or whole), /v1/models, /health.

Bad requests get a 4xx with OpenAI's error body and never reach the engine; a client that goes away mid-stream
cancels its sequence, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from core.errors import SettingsError
from core.model_runner import ModelRunner
from core.serving.engine import Engine, Event, Sequence

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param, self.code)


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class CompletionRequest:
    """A checked /v1/completions or /v1/chat/completions body, tokenized."""

    def __init__(self, body: Any, chat: bool, runner: ModelRunner, model_name: str):
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        if body.get("model") != model_name:
            raise BadRequest(404, f"The model '{body.get('model')}' does not exist; this server serves "
                                  f"'{model_name}'", param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise BadRequest(400, "only n=1 is supported", param="n")
        self.chat, self.stream = chat, bool(body.get("stream", False))
        self.return_token_ids = bool(body.get("return_token_ids", False))
        self.ignore_eos = bool(body.get("ignore_eos", False))  # vLLM's extension, for load tests
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        tokenizer = runner.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(message, dict) and isinstance(message.get("content"), str) for message in messages):
                raise BadRequest(400, "'messages' must be a non-empty list of {role, content} objects",
                                 param="messages")
            text = tokenizer.apply_chat_template([{"role": m.get("role", "user"), "content": m["content"]}
                                                  for m in messages], add_generation_prompt=True, tokenize=False)
            self.prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest(400, "'prompt' must be a non-empty string", param="prompt")
            self.prompt_ids = tokenizer(prompt)["input_ids"]
        if len(self.prompt_ids) > runner.input_max_len:
            raise BadRequest(400, f"the prompt has {len(self.prompt_ids)} tokens; this server takes at most "
                                  f"{runner.input_max_len} (data_config.input_max_len)", param="messages" if chat
                             else "prompt", code="context_length_exceeded")
        limit = runner.max_new_tokens
        self.max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if self.max_tokens is None:
            self.max_tokens = limit if chat else 16  # OpenAI's completions default
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= limit:
            raise BadRequest(400, f"max_tokens must be an integer from 1 to {limit} (data_config.max_new_tokens, "
                                  f"the KV cache's room), got {self.max_tokens!r}", param="max_tokens")
        changes = {key: body[key] for key in SAMPLING_FIELDS if body.get(key) is not None}
        if "temperature" in changes:
            changes["do_sample"] = True
        if "seed" not in changes:  # unseeded requests draw differently from one another
            changes["seed"] = random.getrandbits(63)
        stop = body.get("stop")
        if stop is not None:
            changes["stop_strings"] = [stop] if isinstance(stop, str) else stop
        try:
            self.sampling = runner.sampling.replace(**changes)
        except (SettingsError, TypeError) as error:
            raise BadRequest(400, str(error).removeprefix("sampling_config.")) from None


def create_app(engine: Engine, runner: ModelRunner, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title=f"recipes-scaffold: {model_name}")
    created = int(time.time())

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if (api_key is not None and request.url.path != "/health"
                and request.headers.get("authorization") != f"Bearer {api_key}"):
            return error_response(401, "Incorrect API key provided", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": runner.batch_size - engine.free_rows(), "waiting": len(engine.waiting),
                "free_rows": engine.free_rows()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "recipes-scaffold"}]}

    async def complete(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return error_response(400, f"the request body is not valid JSON: {error}")
        try:
            checked = CompletionRequest(body, chat, runner, model_name)
        except BadRequest as error:
            return error.response()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        sequence = Sequence(request_id, checked.prompt_ids, checked.max_tokens, checked.sampling,
                            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                            stop_ids=frozenset(checked.sampling.eos_token_id), ignore_eos=checked.ignore_eos)
        if not engine.submit(sequence):
            return error_response(429, "the server's queue is full; retry later", kind="rate_limit_exceeded")
        if checked.stream:
            return StreamingResponse(_stream(sequence, events, checked, model_name), media_type="text/event-stream")
        try:
            text, event = "", None
            while event is None or event.finish_reason is None:
                event = await events.get()
                text += event.text
        finally:
            sequence.cancel()
        if event.finish_reason == "error":
            return error_response(500, f"generation failed: {event.text}", kind="server_error")
        response = _whole(request_id, chat, model_name, text, event)
        if checked.return_token_ids:  # vLLM's extension: the generated token ids beside the text
            response["choices"][0]["token_ids"] = list(sequence.output_ids)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _whole(request_id: str, chat: bool, model_name: str, text: str, event: Event) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": event.finish_reason}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason})
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": [choice], "usage": _usage(event)}


async def _stream(sequence: Sequence, events: asyncio.Queue, checked: CompletionRequest,
                  model_name: str) -> AsyncIterator[str]:
    chat = checked.chat
    created = int(time.time())

    def chunk(text: str | None, finish_reason: str | None, first: bool = False, usage: dict | None = None) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            body = {"id": sequence.id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices}
        else:
            choices = [] if usage else [{"index": 0, "text": text or "", "logprobs": None,
                                         "finish_reason": finish_reason}]
            body = {"id": sequence.id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        event = None
        while event is None or event.finish_reason is None:
            event = await events.get()
            if event.finish_reason == "error":
                error = {"message": f"generation failed: {event.text}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if event.text:
                yield chunk(event.text, None)
        if event.finish_reason == "error":
            yield "data: [DONE]\n\n"
            return
        yield chunk(None, event.finish_reason)
        if checked.include_usage:
            yield chunk(None, None, usage=_usage(event))
        yield "data: [DONE]\n\n"
    finally:
        # A client that disconnected lands here too (the generator is closed): its row is freed next step.
        sequence.cancel()
