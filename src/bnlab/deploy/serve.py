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
  from the request's arrival; a slow client would hold an admission slot); 413 over a size limit (body bytes, samples, JSON
  values, image pixels); 415 another media type; 422 a readable input that does not fit (shape,
  types, nesting depth, number length, non-finite values or outputs, not an image). The limits are
  ``bnlab.payload``'s, plus ``max_body_bytes`` and ``MAX_BATCH`` samples per request.
- **An error never costs the client its keep-alive connection** (but a 408: the rest of that body may still come): every error is a complete
  response, and nothing raised inside reaches uvicorn (which closes the connection of an
  application that raised after it began to answer).
- **The event loop only moves bytes**, so /health answers in milliseconds under load. Decoding
  (JSON parsing, images) runs in ``decoders`` worker processes: a full batch's JSON parse holds the
  GIL for ~0.1 s, which a thread would take from every other request. Inference runs in one
  thread (torch uses every core itself, and releases the GIL). At most ``2 × decoders`` requests
  are admitted at a time; the others wait with their bodies unread, so a flood costs sockets, not
  memory.
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
# sends it slower holds one of the few admission slots; one that waited for its slot gets at least
# READ_SECONDS once it is read (its body may still be on its side of the socket)
BODY_SECONDS = 60.0
READ_SECONDS = 5.0
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
    """Raised by Guard's ``receive``: the body passed a limit; the app answers with ``status`` (and closes the
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


class Guard:
    """The outermost ASGI layer.

    - Bodies over ``limit`` bytes get 413: at once when Content-Length says so, otherwise (chunked)
      as soon as the bytes read pass it; the rest is never buffered.
    - A body not all in within ``body_seconds`` of the request's arrival, and at least ``READ_SECONDS``
      after the app began reading it, gets 408 (a slow or stalled client would hold an admission slot
      for as long as it liked); once ``stop_reading()`` is called (the server is stopping), within
      ``STOP_SECONDS`` of that call.
    - No exception leaves it: an error the app could not answer is answered here (500, logged),
      and one raised after the answer began is only logged. uvicorn would close the connection.
    """

    def __init__(self, app, limit: int, body_seconds: float = BODY_SECONDS):
        self.app, self.limit, self.body_seconds = app, limit, body_seconds
        self.too_large = f"request body larger than {limit} bytes"
        self.stop_by = float("inf")

    def stop_reading(self) -> None:
        """The server is stopping: bodies still arriving, admitted or queued, get ``STOP_SECONDS`` more at most.
        Safe to call from a signal handler."""
        self.stop_by = min(self.stop_by, time.monotonic() + STOP_SECONDS)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, {"detail": self.too_large})
        arrived = time.monotonic()
        seen, started, deadline, body_in = 0, False, None, False

        async def counted_receive():
            nonlocal seen, deadline, body_in
            if body_in:  # after the body only a disconnect can come, whenever it likes
                return await receive()
            if deadline is None:  # the first read: admitted
                deadline = max(arrived + self.body_seconds, time.monotonic() + min(READ_SECONDS, self.body_seconds))
            while True:
                # past the deadline one more read still takes what has already come; each wait ends within a
                # second, to see a stop begin
                limit = min(deadline, self.stop_by)
                with anyio.move_on_after(max(0.0, min(limit - time.monotonic(), 1.0))):
                    message = await receive()
                    break
                if time.monotonic() >= limit:
                    when = "before the server stopped" if self.stop_by <= deadline else \
                        f"within {self.body_seconds:g} s of the request"
                    raise BodyTooSlow(f"the request body did not all arrive {when} ({seen} bytes read)")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.too_large)
                body_in = not message.get("more_body", False)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception as e:  # noqa: BLE001 - the last line of defence, by design
            if not isinstance(e, BodyRefused):
                log.error("error while answering %s %s", scope.get("method"), scope.get("path"), exc_info=e)
            if not started:
                refused = isinstance(e, BodyRefused)
                await _send_json(send, e.status if refused else 500,
                                 {"detail": str(e) if refused else f"internal error: {type(e).__name__}"},
                                 close=refused and e.closes)


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
             "began reading; or the server is stopping); the connection closes.",
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
               body_seconds: float = BODY_SECONDS):
    """The ASGI app serving a checkpoint (a folder, a run folder and ``which``, or a loaded Checkpoint).

    ``bn_stats``: which statistics BN uses (``bnlab.deploy.predict.model_for_bn_stats``): "running", "batch"
    (each request's samples normalised together; a one-sample request to a model with BN over features
    gets a 422 saying why) or "recalibrated" (on the inputs in the files ``recalibrate_on``, at start).

    ``max_image_pixels`` defaults to ``bnlab.payload.default_max_image_pixels`` of the model's input;
    ``decoders`` is the number of decoding processes; a body not all in within ``body_seconds`` of the
    request's arrival gets 408 (``Guard``). Limits out of range raise ValueError."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect

    from bnlab.models import summarize

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, which=which)
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

    @app.exception_handler(BodyRefused)
    async def _refused(request, exc):
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)},
                            headers={"connection": "close"} if exc.closes else None)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, exc):  # nobody reads this answer; it only ends the request quietly
        return JSONResponse(status_code=400, content={"detail": "the client disconnected"})

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
        async with admission:  # bodies of requests beyond it stay unread in their sockets
            try:
                if media == "application/json":
                    batch, prescaled, tf = await decoding.run(payload.json_to_batch, await request.body(), shape,
                                                              MAX_BATCH, last)
                else:
                    tf = False
                    batch, prescaled = await decoding.run(payload.image_to_batch, await image_upload(request),
                                                          shape, max_image_pixels, last)
                body = await anyio.to_thread.run_sync(answer, batch, prescaled, tf, limiter=inference)
            except InputError as e:
                raise HTTPException(error_status(e), str(e)) from None
        return Response(body, media_type="application/json")

    return Guard(app, max_body_bytes, body_seconds)

