"""The REST server (optional extra ``bnlab[serve]``): FastAPI under uvicorn.

    POST /predict   JSON {"inputs": one sample or a batch, "prescaled": false} or a multipart image upload
    GET  /health    liveness
    GET  /model     which model (best-validation or final, its epoch), summary, spec, classes, preprocessing
    GET  /openapi.json, /docs

Input is validated and answered with 4xx and a message (shape, dtype, size, non-finite numbers,
bytes that are not an image); bodies over ``max_body_bytes`` get 413 before they are read whole.
No input crashes the server: anything unexpected is a 500 with a message, and the server goes on.

Given a run folder it serves the best-validation model (``checkpoint/``) unless ``which="final"``;
/model and every /predict answer say which model it is.
"""


import json
from pathlib import Path

from bnlab.checkpoint import load_checkpoint
from bnlab.deploy.predict import InputError, as_batch, image_to_array, predict

MAX_BATCH = 1024


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``limit`` bytes with 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(checkpoint: "str | Path", *, which: "str | None" = None, max_body_bytes: int = 4 * 1024 * 1024):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from bnlab.models import summarize

    ck = load_checkpoint(checkpoint, which=which)
    model, spec = ck.model.eval(), ck.model.spec
    shape = tuple(spec.input_shape)
    classes = ck.meta.get("classes")
    summary_text = summarize(model, shape, name=Path(ck.path).name).to_text()
    used = {"kind": ck.kind, "epoch": ck.meta.get("epoch"), "path": str(ck.path), "description": ck.describe()}

    app = FastAPI(title="bnlab model server", version="1",
                  description=f"Predictions of the bnlab {ck.describe()}; input shape {shape}.")
    app.state.checkpoint = ck

    @app.exception_handler(_TooLarge)
    async def _too_large(request, exc):
        return JSONResponse(status_code=413, content={"detail": f"request body larger than {max_body_bytes} bytes"})

    @app.exception_handler(Exception)
    async def _any(request, exc):  # the server goes on whatever happens
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: {exc}"})

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def model_info():
        return {"model": used, "input_shape": list(shape), "num_classes": spec.num_classes, "classes": classes,
                "spec": ck.spec, "preprocessing": ck.preprocessing, "summary": summary_text}

    @app.post("/predict", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"description": f"one sample of shape {list(shape)} or a batch"},
            "prescaled": {"type": "boolean", "default": False}}}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}}, "required": True}})
    async def predict_endpoint(request: Request):
        ctype = request.headers.get("content-type", "")
        try:
            if ctype.startswith("application/json"):
                try:
                    body = json.loads(await request.body())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise InputError(f"the body is not valid JSON ({e})") from None
                if not isinstance(body, dict) or "inputs" not in body:
                    raise InputError('expected a JSON object {"inputs": [...]}')
                prescaled = body.get("prescaled", False)
                if not isinstance(prescaled, bool):
                    raise InputError(f"prescaled must be true or false (got {prescaled!r})")
                try:
                    import numpy as np
                    arr = np.array(body["inputs"], dtype=float)
                except (ValueError, TypeError):
                    raise InputError("inputs must be a (nested) list of numbers of one rectangular shape") from None
                batch = as_batch(arr, shape, "inputs")
            elif ctype.startswith("multipart/form-data"):
                form = await request.form()
                upload = form.get("file")
                if upload is None or not hasattr(upload, "read"):
                    raise InputError("expected an image upload in the form field 'file'")
                batch = image_to_array(await upload.read(), shape)[None]
                prescaled = False
            else:
                raise HTTPException(415, f"expected application/json or multipart/form-data (got {ctype or 'none'})")
            if len(batch) > MAX_BATCH:
                raise InputError(f"at most {MAX_BATCH} samples per request (got {len(batch)})")
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        preds = predict(model, batch, ck.preprocessing, classes, prescaled=prescaled)
        return {"model": {"kind": used["kind"], "epoch": used["epoch"]},
                "predictions": [{"class": p.label, "name": p.name, "probabilities": p.probabilities}
                                for p in preds]}

    return BodyLimit(app, max_body_bytes) if max_body_bytes else app
