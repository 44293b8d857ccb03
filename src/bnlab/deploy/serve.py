"""The REST server (optional extra ``bnlab[serve]``): FastAPI under uvicorn.

    POST /predict   JSON {"inputs": one sample or a batch, "prescaled": false}, TF Serving's
                    {"instances": [sample, ...]} (answered {"predictions": [[probabilities], ...]}), or a
                    multipart form with one image in the field "file"; images channels first or, as
                    Keras has them, channels last
    GET  /health    liveness
    GET  /model     which model (best-validation or final, its epoch), summary, spec, classes, preprocessing
    GET  /openapi.json, /docs (Swagger UI from bundled files: works offline)

What it promises:

- **No input gets a 5xx.** Every refusal is a 4xx with ``{"detail": message}`` (what was expected,
  what arrived), and every 4xx of a route is in its OpenAPI schema: 400 an unreadable body (not
  UTF-8, not JSON, a broken multipart form); 408 a body that does not arrive in time (``body_seconds``
  from the request's arrival; a slow client would hold its bytes of the body budget); 413 over a size limit (body bytes, samples, JSON
  values, image pixels); 415 another media type; 422 a readable input that does not fit (shape,
  types, nesting depth, number length, non-finite values or outputs, not an image). The limits are
  ``bnlab.payload``'s, plus ``max_body_bytes`` and ``MAX_BATCH`` samples per request.
- **An error never costs the client its keep-alive connection** (but a 408: the rest of that body may still come): every error is a complete
  response, and nothing raised inside reaches uvicorn (which closes the connection of an
  application that raised after it began to answer).
- **The event loop only moves bytes**, so /health answers in milliseconds under load. Decoding
  (JSON parsing, images) runs in ``decoders`` worker processes: a full batch's JSON parse holds the
  GIL for ~0.1 s, which a thread would take from every other request. Inference runs in one
  thread (torch uses every core itself, and releases the GIL).
- **A client that has not delivered its body holds no model slot.** A request is admitted (at most
  ``2 × decoders`` at a time, the others wait in turn) only once its body is all in: ``Guard`` reads it
  first, so a client dripping its body one byte at a time costs a socket and the bytes it sent, until its
  408, while honest requests are admitted past it (tests/test_serve_fairness.py: three drippers, eight honest
  clients, p99 in milliseconds). Memory stays bounded by a byte budget for bodies being read or waiting
  (``BodyBudget``: ``body_budget``, default 16 × ``max_body_bytes`` = 64 MiB, reserved by Content-Length, by
  ``max_body_bytes`` for a chunked body); bodies over 64 KiB share three quarters of it, so small requests
  (one MNIST sample is ~4 kB of JSON) find room even while large uploads, honest or dripping, hold the rest. A
  request that finds no room waits with its body unread, so a flood costs sockets, not memory. (Clients that
  fill even the small quarter, hundreds of connections at once, are for a reverse proxy's per-client limits.)
- **Stopping** (the end of the ASGI lifespan; ``bnlab serve`` on SIGINT or SIGTERM) comes after the
  requests in flight are answered, then the decoder processes stop.

Given a run folder it serves the best-validation model (``checkpoint/``) unless ``which="final"``;
/model and every /predict answer say which model it is.
"""

import asyncio
import json
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from pydantic import BaseModel, ConfigDict, Field

from bnlab import payload
from bnlab.checkpoint import Checkpoint, load_checkpoint
from bnlab.deploy.predict import InputError, LooksPrescaled, channels_last, model_for_bn_stats, predict
from bnlab.payload import InputTooLarge, UnreadableInput

MAX_BATCH = 1024
MAX_BODY_BYTES = 4 * 1024 * 1024  # a full batch of 1024 MNIST images written as JSON takes ~3.7 MB
# seconds a body has to be all in from the request's arrival (4 MB in 60 s is 0.5 Mbit/s): a client that
# sends it slower costs a socket and the bytes it sent until then; one that waited for room in the body
# budget gets at least READ_SECONDS once it is read (its body may still be on its side of the socket)
BODY_SECONDS = 60.0
READ_SECONDS = 5.0
# bodies are read whole before admission, within a byte budget (default BODY_BUDGET_BODIES full bodies); a
# body over SMALL_BODY bytes (or chunked, its size unknown) may use three quarters of it, so small requests
# (one MNIST sample is ~4 kB of JSON) always find room while large uploads, honest or dripping, hold the rest
BODY_BUDGET_BODIES = 16
SMALL_BODY = 64 * 1024
# once the server is stopping, bodies still arriving get this long: uvicorn waits 30 s for the requests in
# flight (the queued ones included) before it cancels them
STOP_SECONDS = 10.0
DECODERS = 2

log = logging.getLogger("uvicorn.error")


def error_status(e: InputError) -> int:
    """The HTTP status of a refused input: 400 unreadable, 413 too large, 422 does not fit."""
    return 400 if isinstance(e, UnreadableInput) else 413 if isinstance(e, InputTooLarge) else 422


# ---------------------------------------------------------------- the ASGI edge

class BodyRefused(Exception):
    """Raised while Guard reads a body: it passed a limit; Guard answers with ``status`` (and closes the
    connection where ``closes``: the rest of that body may never come)."""

    status, closes = 400, False


class BodyTooLarge(BodyRefused):
    """Over ``max_body_bytes``: 413."""

    status = 413


class BodyTooSlow(BodyRefused):
    """Not all in by its deadline (``Guard``): 408, and the connection closes."""

    status, closes = 408, True


async def _send_json(send, status: int, content: dict, close: bool = False) -> None:
    body = json.dumps(content).encode()
    close = [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *close]})
    await send({"type": "http.response.body", "body": body})


class BodyBudget:
    """The bytes of request bodies the server holds at once: reserved before a body is read (its Content-Length,
    or the body limit for a chunked one), given back when its request is answered. ``total`` bytes in all,
    and bodies over ``small`` bytes share at most three quarters of it: a quarter stays for small bodies.
    A request that finds no room waits, its body unread in its socket, and is let in as soon as it fits."""

    def __init__(self, total: int, small: int = SMALL_BODY):
        self.total, self.small = total, small
        self.large_total = total - total // 4
        self.used = self.used_large = 0
        self._waiters: list[asyncio.Future] = []

    def _fits(self, size: int) -> bool:
        return self.used + size <= self.total and (size <= self.small or self.used_large + size <= self.large_total)

    @asynccontextmanager
    async def hold(self, size: int):
        large = size > self.small
        while not self._fits(size):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self.used += size
        self.used_large += size if large else 0
        try:
            yield
        finally:  # synchronous, so a cancelled request gives its bytes back too
            self.used -= size
            self.used_large -= size if large else 0
            for waiter in self._waiters:  # each waiter checks again whether it fits, first come first
                if not waiter.done():
                    waiter.set_result(None)


class Guard:
    """The outermost ASGI layer: the app sees a request only once its body is all in.

    - Bodies over ``limit`` bytes get 413: at once when Content-Length says so, otherwise (chunked)
      as soon as the bytes read pass it; the rest is never buffered.
    - A body is read whole before the app is called (so before /predict takes an admission slot: a client
      still sending holds none), within ``body_budget`` bytes of bodies at once (``BodyBudget``; a request
      that finds no room waits, its body unread).
    - A body not all in within ``body_seconds`` of the request's arrival, and at least ``READ_SECONDS``
      after the Guard began reading it (a request that waited for room in the budget), gets 408 and the
      connection closes (a slow or stalled client would hold its bytes of the budget for as long as it liked);
      once ``stop_reading()`` is called (the server is stopping), within ``STOP_SECONDS`` of that call.
    - A client that leaves before its body is in gets no answer; the app never sees it.
    - No exception leaves it: an error the app could not answer is answered here (500, logged),
      and one raised after the answer began is only logged. uvicorn would close the connection.
    """

    def __init__(self, app, limit: int, body_seconds: float = BODY_SECONDS, body_budget: int | None = None,
                 small_body: int = SMALL_BODY):
        self.app, self.limit, self.body_seconds = app, limit, body_seconds
        self.budget = BodyBudget(BODY_BUDGET_BODIES * limit if body_budget is None else body_budget, small_body)
        if self.budget.total < 2 * limit:  # so that a body of the limit fits in the three quarters
            raise ValueError(f"body_budget must be at least twice max_body_bytes, {2 * limit} "
                             f"(got {self.budget.total})")
        self.too_large = f"request body larger than {limit} bytes"
        self.stop_by = float("inf")

    def stop_reading(self) -> None:
        """The server is stopping: bodies still arriving, or waiting for room to be read, get ``STOP_SECONDS``
        more at most. Safe to call from a signal handler."""
        self.stop_by = min(self.stop_by, time.monotonic() + STOP_SECONDS)

    async def _read_body(self, receive, arrived: float) -> bytes | None:
        """The whole body (None: the client left first); BodyRefused past a limit."""
        deadline = max(arrived + self.body_seconds, time.monotonic() + min(READ_SECONDS, self.body_seconds))
        parts, seen = [], 0
        while True:
            # past the deadline one more read still takes what has already come; each wait ends within a
            # second, to see a stop begin
            limit, message = min(deadline, self.stop_by), None
            with anyio.move_on_after(max(0.0, min(limit - time.monotonic(), 1.0))):
                message = await receive()
            if message is None:
                if time.monotonic() >= limit:
                    when = "before the server stopped" if self.stop_by <= deadline else \
                        f"within {self.body_seconds:g} s of the request"
                    raise BodyTooSlow(f"the request body did not all arrive {when} ({seen} bytes read)")
                continue
            if message["type"] != "http.request":  # http.disconnect
                return None
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                raise BodyTooLarge(self.too_large)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, {"detail": self.too_large})
        arrived = time.monotonic()
        # HTTP/1.1: a body has a Content-Length, or is chunked (of a size not known yet), or is empty
        size = int(declared) if declared is not None and declared.isdigit() else \
            self.limit if b"chunked" in headers.get(b"transfer-encoding", b"").lower() else 0
        async with self.budget.hold(size):
            try:
                body = await self._read_body(receive, arrived)
            except BodyRefused as e:
                return await _send_json(send, e.status, {"detail": str(e)}, close=e.closes)
            if body is None:  # nobody to answer (uvicorn expects no answer once the client is gone)
                return
            replay = [{"type": "http.request", "body": body, "more_body": False}]
            del body

            async def buffered_receive():  # the body, then whatever comes (only a disconnect can)
                return replay.pop() if replay else await receive()

            started = False

            async def tracked_send(message):
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self.app(scope, buffered_receive, tracked_send)
            except Exception as e:  # noqa: BLE001 - the last line of defence, by design
                log.error("error while answering %s %s", scope.get("method"), scope.get("path"), exc_info=e)
                if not started:
                    await _send_json(send, 500, {"detail": f"internal error: {type(e).__name__}"})


# ---------------------------------------------------------------- decoding off the event loop

class Decoders:
    """Worker processes that turn request bytes into batches (``bnlab.payload``), started lazily or
    by ``start()``; ``close()`` waits for the tasks in flight.

    A decoder that dies (a crash in an image library) breaks the pool for every task in it: each
    of those is retried once in a fresh pool, so only the input that crashed it twice is refused."""

    def __init__(self, count: int, max_image_pixels: int):
        self.count, self.max_image_pixels = count, max_image_pixels
        self._pool: ProcessPoolExecutor | None = None

    def _current(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=payload.decoder_setup,
                                             initargs=(os.getpid(), self.max_image_pixels))
        return self._pool

    async def start(self) -> None:
        pool = self._current()
        await asyncio.gather(*(asyncio.wrap_future(pool.submit(payload.decoder_ready)) for _ in range(self.count)))

    async def run(self, fn, *args):
        for _ in range(2):
            pool = self._current()
            try:
                return await asyncio.wrap_future(pool.submit(fn, *args))
            except BrokenProcessPool:
                if self._pool is pool:
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
        raise InputError("decoding this input crashed a decoder process twice")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------- the schema of answers

class ErrorBody(BaseModel):
    detail: str = Field(description="what was expected and what arrived")


class ModelUsed(BaseModel):
    kind: str = Field(description='"best" (best-validation), "final" or "unknown"')
    epoch: int | None


class PredictionOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: int = Field(alias="class")
    name: str
    probabilities: list[float]


class PredictAnswer(BaseModel):
    model: ModelUsed
    predictions: list[PredictionOut]
    warnings: list[str] | None = Field(None, description="e.g. inputs in [0, 1] sent without prescaled: true")


class TFServingAnswer(BaseModel):
    predictions: list[list[float]] = Field(description='the class probabilities of each of the "instances"')
    warnings: list[str] | None = Field(None, description="e.g. inputs in [0, 1] sent without prescaled: true")


class Health(BaseModel):
    status: str


_WHY = {400: "An unreadable body: not UTF-8, not JSON, or a broken multipart form.",
        408: "The body was not all in within the server's time for it (bnlab serve --body-seconds, default "
             f"{BODY_SECONDS:g} s from the request's arrival, at least {READ_SECONDS:g} s of it after the server "
             "began reading (bodies are read whole before a request is admitted); or the server is stopping); the "
             "connection closes.",
        413: f"Over a size limit: body bytes, samples per request (at most {MAX_BATCH}), JSON values, "
             "image pixels.",
        415: "A media type other than application/json or multipart/form-data.",
        422: "A readable input that does not fit the model: shape, types, keys, nesting depth "
             f"(at most {payload.MAX_JSON_DEPTH}), number length (at most {payload.MAX_NUMBER_CHARS} "
             "characters), NaN or values beyond float32, outputs that overflow, bytes that are no image."}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


def _request_body_schema(shape: tuple[int, ...], channels_last: bool = False, raw_pixels: bool = True) -> dict:
    """The OpenAPI request body of /predict: nested arrays of one of the accepted sample shapes
    (``payload.accepted_forms``: the model's layout, the other channel order, (H, W) grey), or a batch."""

    def nested(dims) -> dict:
        sample: dict = {"type": "number"}
        for n in reversed(dims):
            sample = {"type": "array", "items": sample, "minItems": n, "maxItems": n}
        return sample

    samples = [nested(f) for f, _ in payload.accepted_forms(shape, channels_last)]
    forms = samples + [{"type": "array", "items": smp, "minItems": 1, "maxItems": MAX_BATCH} for smp in samples]
    values = ("raw values as in the dataset (pixels 0..255)" if raw_pixels
              else "values as the model takes them (it has no preprocessing)")
    inputs = {"anyOf": forms, "description": f"one sample of shape {list(shape)} (or the same image in the other "
                                             f"channel order) or a batch of at most {MAX_BATCH}; {values}"}
    sample = {"anyOf": samples}
    instances = {"type": "array", "items": sample, "minItems": 1, "maxItems": MAX_BATCH,
                 "description": "TF Serving's row format: a list of samples (answered with {\"predictions\": "
                                "[[probabilities], ...]})"}
    prescaled = {"type": "boolean", "default": False}
    return {"required": True, "content": {
        "application/json": {"schema": {"anyOf": [
            {"type": "object", "required": ["inputs"], "additionalProperties": False,
             "properties": {"inputs": inputs, "prescaled": prescaled}},
            {"type": "object", "required": ["instances"], "additionalProperties": False,
             "properties": {"instances": instances, "signature_name": {"type": "string"},
                            "prescaled": prescaled}}]}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"a {', '.join(payload.IMAGE_FORMATS)} image"}}}}}}


# ---------------------------------------------------------------- the app

def _offline_fastapi():
    """FastAPI whose /docs page loads Swagger UI from files bundled with the package (fastapi-offline),
    not from a CDN, so it works on a machine without internet; plain FastAPI if it is not installed."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:  # pragma: no cover - fastapi-offline is in the serve extra
        from fastapi import FastAPI

        return FastAPI
    return FastAPIOffline


def create_app(checkpoint: "str | Path | Checkpoint", *, which: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_image_pixels: int | None = None,
               decoders: int = DECODERS, bn_stats: str = "running", recalibrate_on=(),
               body_seconds: float = BODY_SECONDS, body_budget: int | None = None,
               trust_factory: bool = False):
    """The ASGI app serving a checkpoint (a folder, a run folder and ``which``, or a loaded Checkpoint;
    ``trust_factory`` as ``load_checkpoint``'s).

    ``bn_stats``: which statistics BN uses (``bnlab.deploy.predict.model_for_bn_stats``): "running", "batch"
    (each request's samples normalised together; a one-sample request to a model with BN over features
    gets a 422 saying why) or "recalibrated" (on the inputs in the files ``recalibrate_on``, at start).

    ``max_image_pixels`` defaults to ``bnlab.payload.default_max_image_pixels`` of the model's input;
    ``decoders`` is the number of decoding processes; a body not all in within ``body_seconds`` of the
    request's arrival gets 408 (``Guard``). Bodies are read whole before a request is admitted, at most
    ``body_budget`` bytes of them at once (default ``BODY_BUDGET_BODIES × max_body_bytes``; ``BodyBudget``).
    Limits out of range raise ValueError."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse, Response

    from bnlab.models import summarize

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(
        checkpoint, which=which, trust_factory=trust_factory)
    spec = ck.model.spec
    model = model_for_bn_stats(ck, bn_stats, recalibrate_on)
    shape = tuple(spec.input_shape)
    if max_image_pixels is None and len(shape) == 3:
        max_image_pixels = payload.default_max_image_pixels(shape)
    least_pixels = shape[-1] * shape[-2] if len(shape) == 3 else 1
    if max_image_pixels is not None and max_image_pixels < least_pixels:
        raise ValueError(f"max_image_pixels must be at least the model's input area, {least_pixels} "
                         f"(got {max_image_pixels})")
    if max_body_bytes < 1 or decoders < 1:
        raise ValueError(f"max_body_bytes and decoders must be at least 1 (got {max_body_bytes} and {decoders})")
    if not body_seconds > 0:
        raise ValueError(f"body_seconds must be more than 0 (got {body_seconds})")
    classes = ck.meta.get("classes")
    last = channels_last(spec)  # a Keras model's (H, W, C) images
    used = {"kind": ck.kind, "epoch": ck.meta.get("epoch")}
    info = {"model": {**used, "path": str(ck.path), "description": ck.describe()}, "bn_stats": bn_stats,
            "input_shape": list(shape),
            "num_classes": spec.num_classes, "classes": classes, "spec": ck.spec,
            "preprocessing": ck.preprocessing,
            "summary": summarize(model, shape, name=Path(ck.path or "model").name).to_text()}
    decoding = Decoders(decoders, max_image_pixels or payload.MIN_IMAGE_PIXEL_LIMIT)
    admission = anyio.Semaphore(2 * decoders)
    inference = anyio.CapacityLimiter(1)

    @asynccontextmanager
    async def lifespan(app):
        await decoding.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(decoding.close)

    app = _offline_fastapi()(title="bnlab model server", version="1", lifespan=lifespan,
                  description=f"Predictions of the bnlab {ck.describe()}; input shape {shape}. Limits: body "
                              f"{max_body_bytes} bytes, {MAX_BATCH} samples per request, JSON nested at most "
                              f"{payload.MAX_JSON_DEPTH} deep, numbers of at most {payload.MAX_NUMBER_CHARS} "
                              f"characters, images of at most {max_image_pixels} pixels.")
    app.state.checkpoint = ck

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # a bug, never an input's doing; Guard logs it and keeps the connection
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}"})

    @app.get("/health", response_model=Health, responses=_errors(413))
    async def health():
        return {"status": "ok"}

    @app.get("/model", responses=_errors(413))
    async def model_info():
        return info

    def answer(batch, prescaled: bool, tf_serving: bool = False) -> bytes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LooksPrescaled)
            preds = predict(model, batch, ck.preprocessing, classes, prescaled=prescaled)
        notes = [str(w.message) for w in caught if issubclass(w.category, LooksPrescaled)]
        if tf_serving:  # TF Serving's answer: the model's output per instance, here the probabilities
            return json.dumps({"predictions": [p.probabilities for p in preds],
                               **({"warnings": notes} if notes else {})}).encode()
        body = {"model": used, "predictions": [
            {"class": p.label, "name": p.name, "probabilities": p.probabilities} for p in preds]}
        if notes:
            body["warnings"] = notes
        return json.dumps(body).encode()

    async def image_upload(request: Request) -> bytes:
        async with request.form(max_files=1, max_fields=1) as form:
            extra = sorted(set(form.keys()) - {"file"})
            if extra:
                raise InputError(f"unexpected form field(s) {', '.join(map(json.dumps, extra))[:200]}: the form "
                                 'takes one image file in the field "file"')
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InputError('expected an image file in the form field "file" (got ' +
                                 ("nothing" if upload is None else "a text field") + ")")
            return await upload.read()

    @app.post("/predict", response_model=PredictAnswer | TFServingAnswer, responses=_errors(400, 408, 413, 415, 422),
              openapi_extra={"requestBody": _request_body_schema(shape, last, bool(ck.preprocessing))})
    async def predict_endpoint(request: Request):
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media not in ("application/json", "multipart/form-data"):
            raise HTTPException(415, f"expected application/json or multipart/form-data (got "
                                     f"{ctype[:80] or 'no content-type'})")
        raw = await request.body()  # all in already (Guard): a client still sending never holds a slot
        async with admission:  # requests beyond it wait with their (buffered) bodies
            try:
                if media == "application/json":
                    batch, prescaled, tf = await decoding.run(payload.json_to_batch, raw, shape, MAX_BATCH, last)
                else:  # the form is parsed from the buffered body (Starlette's request.stream() replays it)
                    tf = False
                    batch, prescaled = await decoding.run(payload.image_to_batch, await image_upload(request),
                                                          shape, max_image_pixels, last)
                body = await anyio.to_thread.run_sync(answer, batch, prescaled, tf, limiter=inference)
            except InputError as e:
                raise HTTPException(error_status(e), str(e)) from None
        return Response(body, media_type="application/json")

    return Guard(app, max_body_bytes, body_seconds, body_budget)

