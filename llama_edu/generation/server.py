"""An OpenAI-compatible HTTP server over the continuous batcher.

    python -m llama_edu serve [MODEL_DIR] [--host 127.0.0.1] [--port 8000] [--slots 8]

serves ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the
tokenizer's chat template) on FastAPI + uvicorn (``pip install "llama_edu[serve]"``), so the
``openai`` client, or anything that speaks its API, talks to a model built from scratch::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="shakespeare-llama", prompt="ROMEO:", max_tokens=20, temperature=0)

Every request goes to one :class:`~llama_edu.generation.batching.ContinuousBatcher`, whose
decode loop runs in one background thread and steps all requests in flight together; the HTTP
side (an asyncio event loop) only tokenizes, validates and turns token ids into text.

Text. A token decoded alone loses the space SentencePiece writes in front of a word, and a
multi-byte character can be spread over several byte tokens; so the text so far is decoded as a
whole after each token (behind the prompt's last tokens, which carry the space a first word
needs) and the newly decoded suffix is what gets sent (as :mod:`llama_edu.streaming` does).
A suffix that might be the start of a ``stop`` sequence, or half a character, waits for the next
token. So the streamed pieces joined are exactly the text a non-streamed request returns.

Requests: ``max_tokens``, ``temperature`` (0 = greedy; default 1 as OpenAI's), ``top_p``,
``seed``, ``stop`` (up to 4 strings), ``stream`` (server-sent events ending ``data: [DONE]``,
``stream_options.include_usage``). Answers carry ``usage`` and ``finish_reason`` "stop"
(end of sequence or a stop string) or "length". A malformed request gets a 4xx answer in
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``, and the server goes on.

In a notebook or a test, serve in-process::

    from llama_edu.generation.server import create_app, serve_in_thread
    app = create_app(model, tokenizer, model_name="shakespeare-llama", slots=4)
    base_url, stop = serve_in_thread(app)      # a free loopback port; base_url ends in /v1
    ...                                        # OpenAI(base_url=base_url, api_key="unused")
    stop()                                     # shuts the server and the decode loop down
    app.state.batcher.timeline                 # [(step, slot, request_id, kind), ...]
    occupancy(app.state.batcher.timeline, app.state.batcher.slots)   # (slots, steps) ids, -1 free

(``occupancy`` is in :mod:`llama_edu.generation.batching`.)
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from .chat import load_model_and_tokenizer
from ..io.files import looks_like_repo_id
from .batching import ContinuousBatcher

INSTALL_HINT = 'serving needs fastapi and uvicorn: pip install "llama_edu[serve]"'
#: Request bodies above this many bytes are refused (413) before they are read whole.
MAX_BODY_BYTES = 1 << 20
MAX_STOP_SEQUENCES = 4
#: Fields of OpenAI's API this server does not implement: refused (400) unless neutral (absent,
#: null, 1 for the counts, otherwise false / 0 / empty), rather than silently ignored.
_UNSUPPORTED = ("n", "best_of", "echo", "logprobs", "top_logprobs", "suffix", "presence_penalty",
                "frequency_penalty", "logit_bias", "tools", "functions", "response_format")
#: Requests waiting for a slot beyond this many are refused (503) instead of queued without end.
MAX_WAITING = 256
#: The fields each endpoint reads (or accepts and ignores: user, metadata, ...); any other field is
#: refused as OpenAI refuses it ("Unrecognized request argument"), so that a typo such as
#: "max_token" is an error rather than a silently different answer.
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
                  *_UNSUPPORTED}
_FIELDS = {
    "completions": _COMMON_FIELDS | {"prompt"},
    "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens", "tool_choice", "function_call",
                              "parallel_tool_calls", "metadata", "store", "service_tier"},
}


class APIError(Exception):
    """A request the server refuses, answered as OpenAI answers it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# Token ids -> text pieces
# --------------------------------------------------------------------------------------------


class IncrementalText:
    """Generated ids -> text pieces that are safe to send: the new suffix of the decoded text,
    minus whatever may still become a ``stop`` string or a whole character.

    ``add(token)`` returns the next piece (maybe ""), and sets ``stopped`` when a stop string
    appeared (the text ends before it); ``flush()`` returns what was held back, at the end.
    ``strip_leading`` drops the whitespace before the first word (a chat answer's)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] = (), strip_leading: bool = False):
        self.tokenizer = tokenizer
        # The prompt's last tokens are decoded in front of the new ids, then cut off again, so the
        # first new word keeps its space. SentencePiece drops the leading spaces of a decoded
        # text, so the context starts with an anchor ("a"), else a context that is only a space
        # would vanish. A prompt without text (just <s>) has no context: the text starts there.
        context = list(prompt_ids[-4:])
        self.context = tokenizer.encode("a", add_special_tokens=False) + context if self._decode(context) else []
        self.context_text = self._decode(self.context)
        self.stop = [s for s in stop if s]
        self.strip_leading = strip_leading
        self.ids: list[int] = []
        self.sent = 0  # characters of text() sent so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        """All the text the new ids decode to so far (stop strings not cut out)."""
        full = self._decode(self.context + self.ids)
        if full.startswith(self.context_text):
            full = full[len(self.context_text):]
        else:  # the context's bytes merged with the new ones: decode the new ids alone
            full = self._decode(self.ids)
        return full.lstrip() if self.strip_leading else full

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        full = self.text()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(full, cut)
        safe = full.rstrip("\ufffd")  # the bytes of a character may still be arriving
        held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if safe.endswith(s[:n])), default=0)
        return self._send(full, len(safe) - held)  # ... and the start of a stop string

    def flush(self) -> str:
        return "" if self.stopped else self._send(self.text(), None)

    def _send(self, full: str, end: int | None) -> str:
        end = len(full) if end is None else end
        piece = full[self.sent:end] if end > self.sent else ""
        self.sent += len(piece)
        return piece


# --------------------------------------------------------------------------------------------
# Reading requests
# --------------------------------------------------------------------------------------------


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sampling(body: dict, prompt_len: int, context: int, default_max_tokens: int | None) -> tuple[dict, list[str]]:
    """max_tokens (default: ``default_max_tokens``, None = the rest of the ``context``) /
    temperature / top_p / seed / stop, checked: the batcher's arguments, and the stop strings."""
    room = context - prompt_len
    for name in _UNSUPPORTED:
        value = body.get(name)
        if value and not (name in ("n", "best_of") and value == 1):
            raise APIError(400, f"'{name}' = {value!r} is not supported by this server; leave it out"[:300], name)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    if prompt_len + max_tokens > context:
        raise APIError(
            400, f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2] (0 = greedy), got {temperature!r}", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise APIError(400, f"seed must be a 64-bit integer, got {seed!r}", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them, "
                       f"got {body.get('stop')!r}", "stop")
    return dict(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed), stop


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return bool(stream), bool(options.get("include_usage", False))


def _message_text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string (or a list of text parts), got {content!r}"[:300],
                   f"messages.{i}.content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object with role 'system', 'user' or 'assistant', "
                           f"got {m!r}"[:300], f"messages.{i}.role")
        out.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's (the model answers it)", "messages")
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, f"'prompt' is required: a string (one prompt per request), got {prompt!r}"[:300], "prompt")
    return prompt


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def require_serving():
    try:
        import fastapi  # noqa: F401  (optional dependencies)
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def create_app(
    model,
    tokenizer,
    model_name: str = "llama_edu",
    slots: int = 8,
    max_len: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_waiting: int = MAX_WAITING,
    batcher: ContinuousBatcher | None = None,
):
    """A FastAPI app serving ``model`` under the name ``model_name``, with a
    :class:`ContinuousBatcher` of ``slots`` rows of ``max_len`` positions (default: the model's
    context) as ``app.state.batcher``; its thread starts and stops with the app, which serves
    once. Bodies over ``max_body_bytes`` are refused with 413; a request that finds
    ``max_waiting`` others waiting for a slot, with 503."""
    require_serving()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    if batcher is None:
        batcher = ContinuousBatcher(model, slots=slots, max_len=max_len, eos_token_id=tokenizer.eos_token_id)
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "llama_edu"}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="llama_edu", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown paths (404), wrong methods (405)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(APIError(400, str(e)[:500]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        error = APIError(500, f"internal error: {type(e).__name__}: {e}"[:500], kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    async def read_body(request: Request, endpoint: str) -> dict:
        """The JSON object of the request, read at most ``max_body_bytes`` far."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            raise APIError(413, f"the request body is larger than {max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body is larger than {max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
            raise APIError(400, f"the request body is not valid JSON: {e}"[:300]) from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:  # "\ud800" is valid JSON but no text: the tokenizer could not take it
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, f"'model' is required: a string, the id listed by GET /v1/models ({model_name!r})", "model")
        check_model(name)
        unknown = sorted(set(body) - _FIELDS[endpoint])
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}"[:300], unknown[0])
        return body

    def sampling(body: dict, prompt_ids: list[int], default_max_tokens: int | None) -> tuple[dict, list[str]]:
        if len(prompt_ids) >= batcher.max_len:
            raise APIError(400, f"This model's maximum context length is {batcher.max_len} tokens; the prompt has "
                           f"{len(prompt_ids)}. Please shorten it.", "prompt", "context_length_exceeded")
        return _sampling(body, len(prompt_ids), batcher.max_len, default_max_tokens)

    def submit(prompt_ids: list[int], params: dict):
        """Queue the request in the batcher (before any answer is sent, so that a refusal is still
        a status code); its tokens arrive from the decode thread in an asyncio queue."""
        if len(batcher.waiting) >= max_waiting:
            raise APIError(503, f"the server is overloaded ({max_waiting} requests waiting); retry later",
                           kind="server_error", code="overloaded")
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def listener(token):  # called in the decode thread
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        try:
            return batcher.submit(prompt_ids, listener=listener, **params), tokens
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # closed: the server is shutting down
            raise APIError(503, str(e), kind="server_error") from None

    async def pieces(submitted, text: IncrementalText, result: dict) -> AsyncIterator[str]:
        """Text pieces of a submitted request as its tokens arrive; then ``result`` holds its
        finish_reason and completion_tokens."""
        handle, tokens = submitted
        try:
            while (token := await tokens.get()) is not None:
                piece = text.add(token)
                if piece:
                    yield piece
                if text.stopped:
                    break
            if not text.stopped:
                rest = text.flush()
                if rest:
                    yield rest
        finally:
            handle.cancel()  # a stop string, or the client went away: free the slot now
        if handle.finish_reason == "error":
            raise APIError(500, f"generation failed: {handle.error}", kind="server_error")
        if handle.finish_reason == "cancelled" and not text.stopped:
            raise APIError(503, "the server is shutting down", kind="server_error")
        result["finish_reason"] = "stop" if text.stopped else handle.finish_reason
        result["completion_tokens"] = len(text.ids) if text.stopped else len(handle.tokens)

    def usage(prompt_ids: list[int], result: dict) -> dict:
        n = result["completion_tokens"]
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

    def sse(stream: AsyncIterator[dict]) -> StreamingResponse:
        async def events():
            try:
                async for chunk in stream:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:  # the status line is sent already: the error is the last event
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return card

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, "completions")
        prompt_ids = tokenizer.encode(_prompt(body))
        params, stop = sampling(body, prompt_ids, 16)  # OpenAI's default max_tokens for completions
        stream, include_usage = _stream_flags(body)
        text, result = IncrementalText(tokenizer, prompt_ids, stop), {}
        submitted = submit(prompt_ids, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def choice(piece: str, finish: str | None) -> dict:
            return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}

        if not stream:
            answer = "".join([p async for p in pieces(submitted, text, result)])
            return {**head, "choices": [choice(answer, result["finish_reason"])], "usage": usage(prompt_ids, result)}

        async def chunks():
            async for piece in pieces(submitted, text, result):
                yield {**head, "choices": [choice(piece, None)]}
            yield {**head, "choices": [choice("", result["finish_reason"])]}
            if include_usage:
                yield {**head, "choices": [], "usage": usage(prompt_ids, result)}

        return sse(chunks())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, "chat")
        messages = _messages(body)
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # roles that do not alternate, ...
            raise APIError(400, str(e), "messages") from None
        params, stop = sampling(body, prompt_ids, None)  # by default, answer until the context is full
        stream, include_usage = _stream_flags(body)
        text, result = IncrementalText(tokenizer, prompt_ids, stop, strip_leading=True), {}
        submitted = submit(prompt_ids, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name}

        if not stream:
            answer = "".join([p async for p in pieces(submitted, text, result)])
            message = {"role": "assistant", "content": answer}
            return {**head, "choices": [{"index": 0, "message": message, "finish_reason": result["finish_reason"]}],
                    "usage": usage(prompt_ids, result)}

        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict, finish: str | None) -> dict:
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def chunks():
            yield chunk({"role": "assistant", "content": ""}, None)
            async for piece in pieces(submitted, text, result):
                yield chunk({"content": piece}, None)
            yield chunk({}, result["finish_reason"])
            if include_usage:
                yield {**head, "choices": [], "usage": usage(prompt_ids, result)}

        return sse(chunks())

    return app


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port the system picks), bound
    before uvicorn starts, so the port is known at once and cannot be taken in between."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"the port must be an integer in [0, 65535] (0: any free port), got {port!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _uvicorn_server(app):
    import uvicorn

    # Streams still open 5 s after a shutdown request are cut, so Ctrl-C never hangs.
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Run ``app`` with uvicorn in a background thread on ``host``:``port`` (0: a free port).
    Returns ``(base_url, stop)``: base_url is ``http://host:port/v1``; ``stop()`` shuts the
    server down (its lifespan closes the batcher) and waits for the thread."""
    require_serving()
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    server = _uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llama_edu-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise OSError(f"the server on {host}:{bound} did not start within {timeout} s")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout)
        sock.close()

    return f"http://{host}:{bound}/v1", stop


def serve(model_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
          device: str | None = None, dtype: str | None = None) -> None:
    """Load a model (default: the shipped one) and serve it until Ctrl-C (KeyboardInterrupt) or
    SIGTERM (returns): the ``serve`` command. A port in use fails before the model loads."""
    require_serving()
    if slots < 1:
        raise ValueError(f"--slots must be a positive integer (requests decoded together), got {slots}")
    if model_dir is not None and not Path(model_dir).is_dir() and not looks_like_repo_id(model_dir):
        raise ValueError(f"MODEL_DIR {model_dir} is not a folder: give a Hugging Face-layout folder "
                         "(config.json, model.safetensors, tokenizer.model) or a hub repo id")
    try:  # first: a port in use fails before the model loads
        sock = bind(host, port)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                      "(check --host; choose another --port, or 0 for any free port)") from None
    try:
        model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype)
        name = Path(model_dir).name if model_dir else "shakespeare-llama"
        app = create_app(model, tokenizer, model_name=name, slots=slots)
        server = _uvicorn_server(app)
        host, port = sock.getsockname()[:2]
        print(f"serving {name} at http://{host}:{port}/v1 with {slots} slots (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: SIGINT
        # becomes KeyboardInterrupt (the CLI's exit status 130); SIGTERM, the usual way to stop
        # a service, needs nothing more and ends with status 0.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            print("server stopped", file=sys.stderr, flush=True)
    finally:
        sock.close()
    if not server.started:
        raise OSError(f"the server on {host}:{port} did not start (see the messages above)")
