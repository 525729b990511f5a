"""The OpenAI-compatible HTTP API (FastAPI; needs the `serve` extra) in front of the continuous-batching `Engine`.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(plain JSON or server-sent events with `"stream": true`). Every error is OpenAI's body
{"error": {"message", "type", "param", "code"}} with 400 (bad request), 404 (unknown model or route),
405, 413 (body over the size limit), 500 or 503; a bad request never reaches the engine and never stops
the server. Per-request CPU work that grows with the request (JSON decoding, chat template, tokenizing,
echoing the prompt) runs in worker threads, so one large request does not stall the event loop (and
with it every other client and /health).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllama.checks import SEED
from tinyllama.errors import json_error_text
from tinyllama.generate import SamplingConfig, TextStreamer
from tinyllama.serve.engine import Engine, Sequence
from tinyllama.serve.logprobs import MAX_LOGPROBS, completion_logprobs_async

log = logging.getLogger("tinyllama.serve")

MAX_N = 16  # choices per request (each is one sequence in the engine)


# ---- errors -------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "union[")))
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{loc}'.", param=loc or None, code="missing_required_parameter")
    value = err.get("input")
    shown = json.dumps(value)[:100] if isinstance(value, (int, float, str, bool, list, dict, type(None))) else repr(value)[:100]
    where = f"'{loc}'" if loc else "the request body"
    return APIError(400, f"Invalid value for {where}: {shown}. {err.get('msg', '')}.", param=loc or None,
                    code="invalid_value")


# ---- request bodies -----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # OpenAI clients send fields we ignore (user, metadata, ...). Python's JSON reader takes NaN and Infinity,
    # which pass a bound like gt=0 (inf) or would reach the sampler: refuse them.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=SEED["lo"], le=SEED["hi"])  # torch's seed range
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    # extensions (as in vLLM)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"'{name}' is not supported by this server; use 'repetition_penalty' instead.",
                               param=name, code="unsupported_parameter")
        if self.logit_bias:
            raise APIError(400, "'logit_bias' is not supported by this server.", param="logit_bias",
                           code="unsupported_parameter")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "'stop' must be up to 4 non-empty strings.", param="stop", code="invalid_value")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)  # see tinyllama.serve.logprobs
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs is not None and self.stream:
            raise APIError(400, "'logprobs' with 'stream' is not supported by this server.", param="logprobs",
                           code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "'best_of' other than 'n' is not supported.", param="best_of", code="unsupported_parameter")
        if self.suffix:
            raise APIError(400, "'suffix' is not supported by this model.", param="suffix", code="unsupported_parameter")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: Optional[bool] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise APIError(400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter")


# ---- the service --------------------------------------------------------------------------------
class _Mailbox:
    """Engine thread -> event loop: (queue, item) pairs are collected under a lock and handed over in one
    loop callback per batch, not one per token. A serving step emits a token for every running request, and
    each `call_soon_threadsafe` writes to the loop's wake-up socket and wakes it; at thousands of tokens/s those
    wake-ups and their GIL hand-overs delay the engine thread's next step (perf/serve_bridge.py measures it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # weak: the service's mailboxes are keyed weakly by their loops
        self.items: list = []
        self.lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            first = len(self.items) == 1
        if first:  # later items ride on the callback already scheduled, until it takes them
            loop = self.loop()
            try:
                if loop is None:
                    raise RuntimeError("the request's event loop is gone")
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # loop closed: nothing will deliver; the engine drops the sequence (on_token)
                with self.lock:
                    self.items.clear()
                raise

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class Service:
    """Request validation, prompt building and the bridge from engine-thread callbacks to asyncio."""

    def __init__(self, engine: Engine, tokenizer, model_name: str) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self._mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
        self.created = int(time.time())
        self.context = engine.max_seq_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist. This server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tinyllama",
                "max_model_len": self.context}

    # -- prompts
    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        # encode_batch, also for one text: it releases the GIL (tokenizers' encode does not), so a long prompt
        # tokenized in a worker thread leaves the event loop free.
        p = req.prompt
        if isinstance(p, str):
            prompts = self.tokenizer.encode_batch([p], bos=True)
        elif p and all(isinstance(x, str) for x in p):
            prompts = self.tokenizer.encode_batch(list(p), bos=True)
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise APIError(400, "'prompt' must be a non-empty string, list of strings or list of token ids.",
                           param="prompt", code="invalid_value")
        vocab = self.engine.model.config.vocab_size
        for ids in prompts:
            if not ids:
                raise APIError(400, "'prompt' has an empty token list.", param="prompt", code="invalid_value")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"'prompt' has token id {bad[0]} outside the vocabulary [0, {vocab}).",
                               param="prompt", code="invalid_value")
        return prompts

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None
        # BOS first, as in chat fine-tuning (template text tokenized with add_bos_token) and in llama.cpp
        bos_text = self.tokenizer.id_to_token(self.tokenizer.bos_id)
        return self.tokenizer.encode_batch([text], bos=not text.startswith(bos_text))[0]  # see completion_prompts

    def sampling(self, req: _Common, prompt_len: int, max_tokens: Optional[int], default_max: Optional[int],
                 param: str) -> SamplingConfig:
        room = self.context - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                f"prompt has {prompt_len} tokens. Please shorten the prompt.",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif prompt_len + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {param}, "
                                f"{max_tokens} in the completion). Please reduce the length.",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingConfig(
            max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p if req.top_p < 1 else None,
            top_k=req.top_k if req.top_k > 0 else None, min_p=req.min_p or None,
            repetition_penalty=req.repetition_penalty, seed=req.seed,
        )

    # -- running
    def start(self, prompt_ids: list[int], cfg: SamplingConfig, out: asyncio.Queue, index: int) -> Sequence:
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = _Mailbox(loop)

        def on_token(tok: int) -> None:
            box.post(out, (index, "token", tok))

        def on_finish(reason: str, error: Optional[str]) -> None:
            box.post(out, (index, "finish", (reason, error)))

        if not self.engine.alive:
            raise APIError(503, "The inference engine is not running.", type="server_error")
        return self.engine.submit(Sequence(prompt_ids, cfg, on_token, on_finish, eos_id=self.tokenizer.eos_id))

    async def generate(self, jobs: list[tuple[list[int], SamplingConfig]], stops: list[str], echo: bool = False,
                       counts: Optional[list[int]] = None, token_ids: Optional[list[list[int]]] = None):
        """Run every job concurrently in the engine; yields (index, text piece, finish_reason or None).
        counts[i] becomes the number of completion tokens of job i (up to a stop string), token_ids[i] those ids."""
        counts = counts if counts is not None else [0] * len(jobs)
        out: asyncio.Queue = asyncio.Queue()
        streamers = [TextStreamer(self.tokenizer, prefix=p, stop=stops) for p, _ in jobs]
        seqs: list[Sequence] = []
        try:
            for i, (p, cfg) in enumerate(jobs):
                if echo:
                    yield i, await run_in_threadpool(self.tokenizer.decode, p), None
                seqs.append(self.start(p, cfg, out, i))
            open_jobs = len(jobs)
            while open_jobs:
                i, kind, value = await out.get()
                st = streamers[i]
                if kind == "token":
                    if st.stopped:
                        continue
                    counts[i] += 1
                    if token_ids is not None:
                        token_ids[i].append(value)
                    piece = st.put(value)
                    if piece:
                        yield i, piece, None
                    if st.stopped:
                        seqs[i].cancel()  # free the slot now; the engine reports "cancelled" later
                        yield i, "", "stop"
                    continue
                open_jobs -= 1
                reason, error = value
                if st.stopped:
                    continue
                if reason == "error":
                    raise APIError(500, f"Generation failed: {error}", type="server_error")
                tail = st.flush()
                yield i, tail, "length" if reason == "length" else "stop"
        finally:
            for s in seqs:
                if not s.finished:
                    s.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes: from Content-Length before
    reading anything, else (a chunked body) while counting the bytes as they arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared):,} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit:,} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, limit: int) -> APIError:
    return APIError(413, f"The request body ({what}) exceeds this server's limit of {limit:,} bytes "
                         "(tinyllama serve --max-request-bytes).", code="request_too_large")


def _decode_request(raw: bytes, model_cls):
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({json_error_text(e)}). The body "
                            "must be a JSON object.", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None


def create_app(engine: Engine, tokenizer, model_name: str, max_request_bytes: int):
    """The FastAPI application; the caller starts `engine` (`tinyllama serve` does it on startup)."""
    svc = Service(engine, tokenizer, model_name)
    app = FastAPI(title="tinyllama", version="1", docs_url=None, redoc_url=None)
    app.state.service = svc

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"Unknown route {request.method} {request.url.path}." if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"Internal server error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    async def parse(request: Request, model_cls):
        raw = await read_body(request, max_request_bytes)
        req = await run_in_threadpool(_decode_request, raw, model_cls)
        svc.check_model(req.model)
        req.check_unsupported()
        return req

    @app.get("/health")
    async def health():
        stats = {"status": "ok" if engine.alive else "engine_stopped", "model": model_name,
                 "running": engine.running, "waiting": engine.waiting.qsize(), "slots": engine.max_batch_size,
                 "engine": engine.stats.as_dict()}
        return JSONResponse(stats, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        svc.check_model(model_id)
        return svc.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompts = await run_in_threadpool(svc.completion_prompts, req)
        jobs = []
        for p in prompts:
            cfg = svc.sampling(req, len(p), req.max_tokens, 16, "prompt")  # OpenAI's default max_tokens is 16
            jobs += [(p, cfg)] * req.n
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def choice(i, text, reason, logprobs=None):
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        counts = [0] * len(jobs)
        ids = [[] for _ in jobs] if req.logprobs is not None else None
        gen = svc.generate(jobs, req.stops(), echo=req.echo, counts=counts, token_ids=ids)
        if req.stream:
            async def events():
                async for i, text, reason in gen:
                    if text or reason:
                        yield _sse({**base, "choices": [choice(i, text, reason)]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(jobs, counts)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(_guarded(events(), gen), media_type="text/event-stream")

        texts, reasons = await _collect(gen, len(jobs))
        lps = [None] * len(jobs)
        if ids is not None:
            lps = await completion_logprobs_async(engine.model, tokenizer, engine.device, [p for p, _ in jobs], ids,
                                                  req.logprobs, req.echo)
        return {**base, "choices": [choice(i, texts[i], reasons[i], lps[i]) for i in range(len(jobs))],
                "usage": _usage(jobs, counts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        prompt = await run_in_threadpool(svc.chat_prompt, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        cfg = svc.sampling(req, len(prompt), max_tokens, None, "messages")
        jobs = [(prompt, cfg)] * req.n
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        counts = [0] * len(jobs)
        gen = svc.generate(jobs, req.stops(), counts=counts)
        if req.stream:
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

            def choice(i, delta, reason):
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

            async def events():
                for i in range(len(jobs)):
                    yield _sse({**base, "choices": [choice(i, {"role": "assistant", "content": ""}, None)]})
                async for i, text, reason in gen:
                    if text:
                        yield _sse({**base, "choices": [choice(i, {"content": text}, None)]})
                    if reason:
                        yield _sse({**base, "choices": [choice(i, {}, reason)]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(jobs, counts)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(_guarded(events(), gen), media_type="text/event-stream")

        texts, reasons = await _collect(gen, len(jobs))
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                             "finish_reason": reasons[i]} for i in range(len(jobs))],
                "usage": _usage(jobs, counts)}

    return app


async def _collect(gen, n: int) -> tuple[list[str], list]:
    """Gather a non-streamed request's pieces into each choice's text and finish reason."""
    texts, reasons = [""] * n, [None] * n
    async for i, text, reason in gen:
        texts[i] += text
        reasons[i] = reason or reasons[i]
    return texts, reasons


def _usage(jobs, counts) -> dict:
    prompt = sum(len(p) for p, _ in jobs)
    completion = sum(counts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _guarded(events, gen):
    """A streamed response has already sent 200: report a failure as an error event, then end the stream.
    If the client goes away, closing `gen` cancels its sequences so their slots free up at once."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
    finally:
        await gen.aclose()
