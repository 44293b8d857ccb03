"""The REST server under hostile use (issue 12, deliverables 6 and 7): `bnlab serve` on loopback
answers every malformed, oversized or hostile request with a 4xx and a message, on the same
keep-alive connection, and stays up; schemathesis fuzzes it from its own OpenAPI schema; SIGINT
and SIGTERM answer the request in flight, then exit 0 with no process left.

The limits themselves (bnlab.payload) are tested here too, without a server."""

import http.client
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402

from bnlab import payload  # noqa: E402
from bnlab.checkpoint import save_checkpoint  # noqa: E402
from bnlab.cli import app  # noqa: E402
from bnlab.deploy import predict  # noqa: E402
from bnlab.deploy.serve import MAX_BATCH  # noqa: E402
from bnlab.models import build_model, load_model_spec  # noqa: E402

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An MLP for 28×28 grey images with real BN statistics (no training needed: nothing here is
    about accuracy)."""
    model = build_model(load_model_spec("fashion-mlp-bn-after"), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(64, *SHAPE, generator=g) * 255 / 255)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "checkpoint", model.eval(),
                           preprocessing={"scaling": "unit", "divide": 255.0},
                           meta={"classes": [f"c{i}" for i in range(10)], "kind": "best", "epoch": 1})


# ---------------------------------------------------------------- bytes the tests send

def _image(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _png(width: int, height: int, rows: int) -> bytes:
    """A grey PNG whose header says width × height, with ``rows`` rows of zeros compressed in it:
    rows == height is a decompression bomb (a few kB that decode to width·height bytes), fewer
    rows a huge header over a small file."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _multipart(*parts, boundary="b0undary", close=True) -> tuple[bytes, dict]:
    """parts: (field, filename or None, bytes)."""
    out = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                + ("Content-Type: application/octet-stream\r\n" if filename else "") + "\r\n").encode() + data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


RNG = np.random.default_rng(0)
DIGIT = RNG.integers(0, 256, (28, 28))
GREY = Image.fromarray(RNG.integers(0, 256, (40, 30), dtype=np.uint8))
BOMB = _png(8000, 8000, 8000)  # ~64 kB that decode to 64 MB
HUGE_HEADER = _png(30000, 30000, 2)


def _json(obj) -> tuple[bytes, dict]:
    return json.dumps(obj).encode(), {"Content-Type": "application/json"}


def _raw(text: "str | bytes", ctype="application/json") -> tuple[bytes, dict]:
    return (text.encode() if isinstance(text, str) else text), ({"Content-Type": ctype} if ctype else {})


def _sample_with(value: str) -> tuple[bytes, dict]:
    """A (28, 28) sample written by hand with its first number replaced by ``value``."""
    rows = ", ".join("[" + ", ".join(["0"] * 28) + "]" for _ in range(27))
    return _raw('{"inputs": [[' + ", ".join([value] + ["0"] * 27) + "], " + rows + "]}")


def _upload(data: bytes, name="x.png") -> tuple[bytes, dict]:
    return _multipart(("file", name, data))


# (id, method, path, body and headers, or chunks for a chunked body; expected status; words of the message)
HOSTILE = [
    ("deep-nesting", "POST", "/predict", _raw("[" * 100_000), 422, "nested 100000 levels deep"),
    ("deep-inputs", "POST", "/predict", _raw('{"inputs": ' + "[" * 9 + "1" + "]" * 9 + "}"), 422, "nested 10 levels"),
    ("int-400-digits", "POST", "/predict", _sample_with("1" * 400), 422, "400 characters"),
    ("int-5000-digits", "POST", "/predict", _sample_with("9" * 5000), 422, "5000 characters"),
    ("float-overflows-float64", "POST", "/predict", _sample_with("1e400"), 422, "NaN or infinite"),
    ("float-beyond-float32", "POST", "/predict", _sample_with("-1e39"), 422, "float32"),
    ("NaN", "POST", "/predict", _sample_with("NaN"), 422, "NaN is not a JSON number"),
    ("Infinity", "POST", "/predict", _sample_with("Infinity"), 422, "Infinity is not a JSON number"),
    ("-Infinity", "POST", "/predict", _sample_with("-Infinity"), 422, "-Infinity is not a JSON number"),
    ("logits-overflow", "POST", "/predict", _json({"inputs": np.full(SHAPE, 3e38).tolist(), "prescaled": True}), 422,
     "output is not finite"),
    ("empty-body", "POST", "/predict", _raw(b""), 400, "not valid JSON"),
    ("garbage-bytes", "POST", "/predict", _raw(bytes(RNG.integers(0, 256, 5000, dtype=np.uint8))), 400, "not UTF-8"),
    ("truncated-json", "POST", "/predict", _raw('{"inputs": [[1, 2'), 400, "not valid JSON"),
    ("utf16-json", "POST", "/predict", _raw('{"inputs": [1]}'.encode("utf-16")), 400, "not UTF-8"),
    ("bom-json", "POST", "/predict", _raw("\ufeff" + '{"inputs": [1]}'), 400, "not valid JSON"),
    ("json-with-comment", "POST", "/predict", _raw('{"inputs": [1] /* x */}'), 400, "not valid JSON"),
    ("wrong-shape", "POST", "/predict", _json({"inputs": [[1, 2], [3, 4]]}), 422, "expected shape (1, 28, 28)"),
    ("ragged", "POST", "/predict", _json({"inputs": [[1, 2], [3]]}), 422, "lists of 1 and 2 items"),
    ("numbers-next-to-lists", "POST", "/predict", _json({"inputs": [[1, 2], 3]}), 422, "numbers next to lists"),
    ("strings", "POST", "/predict", _json({"inputs": [["1", "2"]]}), 422, "found a string"),
    ("booleans", "POST", "/predict", _json({"inputs": [[True, 1.0]]}), 422, "found true/false"),
    ("null-inputs", "POST", "/predict", _json({"inputs": None}), 422, "found null"),
    ("objects-in-lists", "POST", "/predict", _json({"inputs": [[{"a": 1}]]}), 422, "found an object"),
    ("scalar-inputs", "POST", "/predict", _json({"inputs": 3}), 422, "got ()"),
    ("empty-inputs", "POST", "/predict", _json({"inputs": []}), 422, "got (0,)"),
    ("top-level-array", "POST", "/predict", _json([1, 2, 3]), 422, "expected a JSON object"),
    ("top-level-string", "POST", "/predict", _json("inputs"), 422, "got a string"),
    ("no-inputs", "POST", "/predict", _json({}), 422, 'missing "inputs"'),
    ("unknown-key", "POST", "/predict", _json({"inputs": [1], "extra": [1]}), 422, 'unexpected key(s) "extra"'),
    ("both-formats", "POST", "/predict", _json({"inputs": [1], "instances": [1]}), 422, 'unexpected key(s) "inputs"'),
    ("tf-bad-signature", "POST", "/predict", _json({"instances": [[1]], "signature_name": 3}), 422,
     "this server has one signature"),
    ("very-long-key", "POST", "/predict", _json({"k" * 100_000: 1}), 422, '"kkkkkkkkkk'),
    ("duplicate-keys", "POST", "/predict", _raw('{"inputs": [1], "inputs": [2]}'), 422, 'duplicate key(s) "inputs"'),
    ("prescaled-not-bool", "POST", "/predict", _json({"inputs": DIGIT.tolist(), "prescaled": "yes"}), 422,
     "prescaled must be true or false"),
    ("too-many-samples", "POST", "/predict", _json({"inputs": np.zeros((MAX_BATCH + 1, *SHAPE), int).tolist()}), 413,
     "JSON values"),
    ("million-empty-lists", "POST", "/predict", _raw("[" + "[]," * 1_000_000 + "[]]"), 413, "JSON values"),
    ("body-over-limit", "POST", "/predict", _raw(b"[" + b"0," * 2_200_000 + b"0]"), 413, "larger than"),
    ("chunked-over-limit", "POST", "/predict", [b"[" + b"0," * 50_000] * 50, 413, "larger than"),
    ("chunked-fine", "POST", "/predict", [b'{"inputs": ', json.dumps(DIGIT.tolist()).encode(), b"}"], 200, None),
    ("text/plain", "POST", "/predict", _raw("hello", "text/plain"), 415, "expected application/json"),
    ("no-content-type", "POST", "/predict", _raw(json.dumps({"inputs": [1]}), None), 415, "no content-type"),
    ("xml", "POST", "/predict", _raw("<inputs/>", "application/xml"), 415, "application/xml"),
    ("urlencoded", "POST", "/predict", _raw("inputs=1", "application/x-www-form-urlencoded"), 415, "urlencoded"),
    ("truncated-multipart", "POST", "/predict", _multipart(("file", "x.png", _image(GREY, "PNG")), close=False), 422,
     "(got nothing)"),  # python-multipart drops a part with no closing boundary
    ("multipart-no-boundary", "POST", "/predict", _raw(b"--x\r\n\r\n", "multipart/form-data"), 400, None),
    ("multipart-wrong-field", "POST", "/predict", _multipart(("image", "x.png", _image(GREY, "PNG"))), 422,
     'unexpected form field(s) "image"'),
    ("multipart-text-field", "POST", "/predict", _multipart(("file", None, b"not a file")), 422, "a text field"),
    ("multipart-two-files", "POST", "/predict", _multipart(("file", "a.png", b"1"), ("file", "b.png", b"2")), 400,
     "Too many files"),
    ("png-bomb", "POST", "/predict", _upload(BOMB), 413, "64,000,000 pixels"),
    ("png-huge-header", "POST", "/predict", _upload(HUGE_HEADER), 413, "900000000 pixels"),
    ("garbage-image", "POST", "/predict", _upload(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100), 422,
     "not an image PIL can read"),
    ("truncated-png", "POST", "/predict", _upload(_image(GREY, "PNG")[:80]), 422, "not an image PIL can read"),
    ("tiff-not-accepted", "POST", "/predict", _upload(_image(GREY, "TIFF"), "x.tif"), 422,
     "not an image of an accepted format (PNG, JPEG, BMP, GIF or WebP)"),
    ("empty-file", "POST", "/predict", _upload(b""), 422, "not an image of an accepted format"),
    ("animated-gif", "POST", "/predict", _upload(_image(GREY.convert("P"), "GIF", save_all=True,
                                                         append_images=[GREY.convert("P")] * 3)), 200, None),
    ("png-16-bit", "POST", "/predict", _upload(_image(Image.fromarray(np.full((28, 28), 60000, np.uint16)), "PNG")),
     200, None),
    ("cmyk-jpeg", "POST", "/predict", _upload(_image(GREY.convert("CMYK"), "JPEG")), 200, None),
    ("palette-transparency", "POST", "/predict", _upload(_image(GREY.convert("P"), "PNG", transparency=0)), 200, None),
    ("rgba-png", "POST", "/predict", _upload(_image(GREY.convert("RGBA"), "PNG")), 200, None),
    ("get-predict", "GET", "/predict", (None, {}), 405, "Method Not Allowed"),
    ("post-health", "POST", "/health", _json({}), 405, "Method Not Allowed"),
    ("unknown-path", "GET", "/../../etc/passwd", (None, {}), 404, "Not Found"),
    ("valid-batch", "POST", "/predict", _json({"inputs": [[DIGIT.tolist()]] * 3}), 200, None),
]


# ---------------------------------------------------------------- a server on loopback

def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _peak_rss_kb(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """`python -m bnlab serve CHECKPOINT --port 0` with its log in a file (a pipe nobody reads
    would fill up with access-log lines and block the server)."""

    def __init__(self, checkpoint: Path, log: Path, *args: str):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bnlab", "serve", str(checkpoint), "--port", "0",
                                          *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            self.port = int(_wait_for(self._port, 90, "the server to start").group(1))
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        self.base = f"http://127.0.0.1:{self.port}"

    def _port(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}: {self.text()}")
        return re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", self.text())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig``, wait for the exit (kill -9 after ``timeout``) and return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _all_pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").glob("[0-9]*")
            if (p / "stat").exists() and " Z " not in (p / "stat").read_text(errors="replace")[:200]}


def _end(pids: set[int], timeout: float = 30) -> None:
    """Wait for the processes to end by themselves; kill -9 those left, then fail."""
    try:
        _wait_for(lambda: not (pids & _all_pids()), timeout, f"the processes {sorted(pids)} to end")
    finally:
        for pid in pids & _all_pids():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("serve") / "server.log")
    below = _descendants(s.proc.pid)
    yield s
    assert s.stop() == 0, s.text()
    _end(below)


class KeepAlive:
    """One HTTP/1.1 connection; every answer must leave it open (same socket, no Connection: close)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        self.sock = self.conn.sock
        self.sent = 0

    def request(self, method: str, path: str, body=None, headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})  # an iterable body goes chunked
        response = self.conn.getresponse()
        data = response.read()
        self.sent += 1
        assert self.conn.sock is self.sock and not response.will_close, \
            f"{method} {path} -> {response.status}: the server closed the keep-alive connection"
        return response.status, data


# ---------------------------------------------------------------- (a) hostile requests

def test_hostile_requests_get_4xx_on_the_same_connection(server):
    """60 kinds of hostile and malformed requests, one keep-alive connection: each gets its exact
    4xx and message (or 200 for the odd images that decode), none ≥ 500, the connection survives
    every one (a /health on it after each), and the server is alive at the end."""
    assert len(HOSTILE) >= 30
    conn = KeepAlive(server.port)
    for name, method, path, payload_, status, words in HOSTILE:
        body, headers = (iter(payload_), {"Content-Type": "application/json"}) if isinstance(payload_, list) \
            else payload_
        got, data = conn.request(method, path, body, headers)
        assert got < 500 and got == status, f"{name}: {got} {data[:300]!r}"
        answer = json.loads(data)
        if status >= 400:
            assert isinstance(answer["detail"], str) and (words is None or words in answer["detail"]), \
                f"{name}: {answer}"
        elif path == "/predict":
            assert all(np.isfinite(p["probabilities"]).all() for p in answer["predictions"]), name
        assert conn.request("GET", "/health") == (200, b'{"status":"ok"}'), name
    assert conn.sent == 2 * len(HOSTILE)
    assert server.proc.poll() is None
    assert "Exception" not in server.text() and "Traceback" not in server.text()


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits of ``data``: flipped, inserted or deleted bytes, a truncation, a
    duplicated slice, or a number/bracket run spliced in."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 5)):
        at = int(rng.integers(0, len(data) + 1))
        kind = rng.integers(0, 7)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        elif kind == 2:
            del data[at:at + int(rng.integers(1, 64))]
        elif kind == 3:
            del data[at:]
        elif kind == 4:
            data[at:at] = data[at:at + int(rng.integers(1, 512))] * int(rng.integers(2, 20))
        elif kind == 5:
            data[at:at] = rng.choice([b"9" * 100, b"1e999", b"-0", b"NaN", b"null", b"true", b'"x"', b"{}"])
        else:
            data[at:at] = b"[" * int(rng.integers(1, 12))
    return bytes(data)


MUTATION_SEEDS = [
    _json({"inputs": DIGIT.tolist()}),
    _json({"inputs": [[DIGIT.tolist()]] * 2, "prescaled": False}),
    _upload(_image(Image.fromarray(DIGIT.astype(np.uint8)), "PNG")),
    _upload(_image(GREY.convert("RGB"), "JPEG")),
    _upload(_image(GREY.convert("P"), "GIF")),
    _upload(_image(GREY, "BMP")),
]


MUTATIONS = 800


def test_mutated_bodies_get_documented_answers(server):
    """800 seeded random corruptions of valid JSON bodies and image uploads (a mutational fuzz,
    complementing schemathesis's schema-driven one), on one keep-alive connection: every answer is
    a documented status (200, 400, 413, 415, 422), the connection survives, the server lives."""
    rng = np.random.default_rng(12)
    conn, seen = KeepAlive(server.port), {}
    for i in range(MUTATIONS):
        body, headers = MUTATION_SEEDS[i % len(MUTATION_SEEDS)]
        status, data = conn.request("POST", "/predict", _mutate(body, rng), headers)
        assert status in (200, 400, 413, 415, 422), (i, status, data[:300])
        seen[status] = seen.get(status, 0) + 1
        if status != 200:
            assert json.loads(data)["detail"]
        if i % 50 == 49:
            assert conn.request("GET", "/health")[0] == 200
    assert seen.get(200) and seen.get(400) and seen.get(422), seen  # the mutations reach every path
    assert server.proc.poll() is None


def test_image_bombs_are_refused_before_decoding(server):
    """An 8000×8000 PNG bomb (64 kB -> 64 MB) and a 30000² header: 413, and no decoder's peak
    memory grows by the size a decode would take (VmHWM, from /proc)."""
    decoders = [p for p in _descendants(server.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(decoders) == 2
    before = {p: _peak_rss_kb(p) for p in decoders}
    conn = KeepAlive(server.port)
    for data in [BOMB] * 4 + [HUGE_HEADER] * 4:  # every decoder sees some
        body, headers = _upload(data)
        status, answer = conn.request("POST", "/predict", body, headers)
        assert status == 413 and "pixels" in json.loads(answer)["detail"]
    grown = {p: _peak_rss_kb(p) - before[p] for p in decoders}
    assert max(grown.values()) < 32 * 1024, grown  # decoding one bomb needs 64 MB


def test_predictions_match_the_library(server, checkpoint):
    """The server's JSON and image answers equal bnlab.deploy.predict on the same arrays."""
    from bnlab.checkpoint import load_checkpoint
    ck = load_checkpoint(checkpoint)
    conn = KeepAlive(server.port)
    batch = RNG.integers(0, 256, (5, *SHAPE))
    status, data = conn.request("POST", "/predict", *_json({"inputs": batch.tolist()}))
    expect = predict(ck.model, batch.astype(np.float32), ck.preprocessing, ck.meta["classes"])
    answer = json.loads(data)
    assert status == 200 and answer["model"] == {"kind": "best", "epoch": 1}
    assert [p["class"] for p in answer["predictions"]] == [p.label for p in expect]
    np.testing.assert_allclose([p["probabilities"] for p in answer["predictions"]],
                               [p.probabilities for p in expect], atol=1e-6)
    status, data = conn.request("POST", "/predict", *_upload(_image(Image.fromarray(DIGIT.astype(np.uint8)), "PNG")))
    expect = predict(ck.model, DIGIT[None, None].astype(np.float32), ck.preprocessing)
    np.testing.assert_allclose(json.loads(data)["predictions"][0]["probabilities"], expect[0].probabilities, atol=1e-6)


def test_every_4xx_is_in_the_openapi_schema(server):
    """Each route documents the 4xx it can give, with the {"detail": str} body; the statuses the
    hostile table met at /predict are all among them."""
    schema = json.loads(KeepAlive(server.port).request("GET", "/openapi.json")[1])
    error = schema["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["detail"] and error["properties"]["detail"]["type"] == "string"
    documented = {path: {int(code) for code in op["responses"]} for path, ops in schema["paths"].items()
                  for op in ops.values()}
    met = {status for _, method, path, *_, status, _ in HOSTILE if path == "/predict" and method == "POST"}
    assert met <= documented["/predict"] == {200, 400, 408, 413, 415, 422}
    for path, codes in documented.items():
        for code in codes - {200}:
            op = next(iter(schema["paths"][path].values()))
            assert op["responses"][str(code)]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, (path, code)


# ---------------------------------------------------------------- (b) schemathesis

def _fuzz(operation, mode, examples: int, base: str, session, checks) -> int:
    """Call ``examples`` generated cases of one operation; return how many requests went out."""
    from hypothesis import HealthCheck, Phase, given, settings

    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def call(case):
        nonlocal sent
        sent += 1
        case.call_and_validate(base_url=base, session=session, checks=checks, timeout=60)

    call()
    return sent


def _schemathesis_run(server, examples_positive: int, examples_negative: int) -> dict:
    """Positive and negative cases of every operation, generated from the server's own OpenAPI
    schema, deterministically (derandomized, no example database); every answer checked for no
    5xx and a documented status, media type and body. Returns the requests sent per operation."""
    schemathesis = pytest.importorskip("schemathesis")
    import requests
    from schemathesis.generation import GenerationMode

    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
              schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    positive, negative = GenerationMode.POSITIVE, GenerationMode.NEGATIVE  # GETs without parameters: no negative
    budget = {("POST /predict", positive): examples_positive, ("POST /predict", negative): examples_negative,
              ("GET /health", positive): 10, ("GET /model", positive): 10}
    session = requests.Session()
    sent = {key: _fuzz(schema.find_operation_by_label(key[0]), key[1], examples, server.base, session, checks)
            for key, examples in budget.items()}
    assert session.get(server.base + "/health").json() == {"status": "ok"}
    assert server.proc.poll() is None
    return sent


def test_schemathesis_finds_no_server_error(server):
    """The default run: positive /predict cases are slow to generate (784 numbers a sample), so
    few of them; with the hostile table and the mutated bodies, over 1,000 requests."""
    sent = _schemathesis_run(server, 30, 120)
    assert sum(sent.values()) + 2 * len(HOSTILE) + MUTATIONS + MUTATIONS // 50 >= 1000, sent


@pytest.mark.slow
def test_schemathesis_at_length(server):
    """Ten times the default run (a few minutes)."""
    sent = _schemathesis_run(server, 400, 1500)
    assert sum(sent.values()) >= 1900, sent


# ---------------------------------------------------------------- (c) stopping

def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_answers_the_request_in_flight_then_exits_0(checkpoint, tmp_path, sig):
    """A request whose body is still arriving when the signal comes is answered (200), then the
    server exits 0 and every process it started (decoders, resource tracker) is gone."""
    server = Server(checkpoint, tmp_path / "server.log", "--decoders", "1", "--max-image-pixels", "1000")
    below = _descendants(server.proc.pid)
    try:
        decoders = [p for p in below if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(decoders) == 1  # the options reach the server
        status, answer = KeepAlive(server.port).request("POST", "/predict", *_upload(_image(GREY, "PNG")))
        assert status == 413 and "30×40 = 1,200 pixels; at most 1,000" in json.loads(answer)["detail"]
        body = json.dumps({"inputs": DIGIT.tolist()}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += sock.recv(1024)
            assert interim.startswith(b"HTTP/1.1 100 ")  # the app is reading this body: the request is in flight
            server.proc.send_signal(sig)
            _wait_for(lambda: "Shutting down" in server.text(), 30, "uvicorn to begin its shutdown")
            sock.sendall(body)
            response = _read_response(sock)
        head, _, content = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), response[:500]
        assert len(json.loads(content)["predictions"]) == 1
        assert server.proc.wait(timeout=60) == 0, server.text()
        assert "stopped: every request in flight was answered" in server.text()
        assert "Traceback" not in server.text()
    finally:
        server.stop(signal.SIGKILL)
        _end(below)


def test_a_body_too_slow_gets_408_and_holds_no_slot(checkpoint, tmp_path):
    """Clients that send headers and then stall (or drip) their bodies get 408 once the body has had
    --body-seconds since the request arrived, and their connections close; they never hold an admission slot
    (issue 27: bodies are read before admission), so a request sent after them is answered before them."""
    server = Server(checkpoint, tmp_path / "server.log", "--decoders", "1", "--body-seconds", "1.5")
    below = _descendants(server.proc.pid)
    body = json.dumps({"inputs": DIGIT.tolist()}).encode()
    head = (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    try:
        slow = []
        for _ in range(4):  # twice the admission slots (2 x decoders): before issue 27 they held them all
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            sock.sendall(head + body[:100])  # and never the rest
            slow.append(sock)
        time.sleep(0.3)
        status, _ = KeepAlive(server.port).request("POST", "/predict", body, {"Content-Type": "application/json"})
        assert status == 200
        for sock in slow:  # answered while the stalled bodies are still waited for (~20 ms of their 1.5 s)
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
        assert KeepAlive(server.port).request("GET", "/health")[0] == 200
        for sock in slow:
            with sock:
                response = _read_response(sock)  # ends: the server closed the connection
            head_, _, content = response.partition(b"\r\n\r\n")
            assert head_.startswith(b"HTTP/1.1 408 "), response[:300]
            assert b"connection: close" in head_.lower()
            assert json.loads(content)["detail"] == "the request body did not all arrive within 1.5 s of the request (100 bytes read)"
        # a body that arrives in pieces within the time is read as usual
        def in_pieces():
            yield body[:100]
            time.sleep(0.5)
            yield body[100:]

        status, _ = KeepAlive(server.port).request("POST", "/predict", in_pieces(),
                                                   {"Content-Type": "application/json"})  # chunked
        assert status == 200
        assert "Traceback" not in server.text()
    finally:
        server.stop(signal.SIGKILL)
        _end(below)


def test_sigterm_answers_stalled_bodies_with_408_then_exits_0(checkpoint, tmp_path):
    """Bodies that will never come, admitted or queued, hold up a stop no longer than STOP_SECONDS: each gets
    408 saying the server is stopping, uvicorn never has to cancel a request (its 30 s), the server exits 0."""
    from bnlab.deploy.serve import STOP_SECONDS

    server = Server(checkpoint, tmp_path / "server.log", "--decoders", "1")  # the default --body-seconds, 60
    below = _descendants(server.proc.pid)
    body = json.dumps({"inputs": DIGIT.tolist()}).encode()
    try:
        stalled = []
        for _ in range(6):  # more than the admission slots (none of them gets one)
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:30])
            stalled.append(sock)
        time.sleep(0.5)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for sock in stalled:
            with sock:
                response = _read_response(sock)
            head, _, content = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), response[:300]
            assert json.loads(content)["detail"] == "the request body did not all arrive before the server stopped (30 bytes read)"
        assert time.monotonic() - t0 < STOP_SECONDS + 5
        assert server.proc.wait(timeout=60) == 0, server.text()
        assert "Traceback" not in server.text() and "Cancel" not in server.text(), server.text()
    finally:
        server.stop(signal.SIGKILL)
        _end(below)


def test_the_body_clock_runs_from_arrival_with_a_read_window_and_stops_with_the_server(monkeypatch):
    """Guard's deadlines, in process: body_seconds from the request's arrival; at least READ_SECONDS after it
    began reading (a request that waited for room in the body budget); STOP_SECONDS once stop_reading() is
    called. The app never sees a body that did not all come."""
    import asyncio

    from bnlab.deploy import serve

    monkeypatch.setattr(serve, "READ_SECONDS", 0.3)
    monkeypatch.setattr(serve, "STOP_SECONDS", 0.2)

    def answered_after(queued: float, body_seconds: float, stop_at: float | None = None):
        async def app(scope, receive, send):
            raise AssertionError("the app was called without the body")

        async def stalled():  # a client that sent its headers and then nothing
            await asyncio.sleep(3600)

        sent = []

        async def send(message):
            sent.append(message)

        async def hold_the_budget(guard):  # other requests' bodies fill the budget for ``queued`` seconds
            async with guard.budget.hold(guard.budget.total):
                await asyncio.sleep(queued)

        async def scenario():
            guard = serve.Guard(app, 10_000, body_seconds, small_body=10**9)  # every body small: one pool
            t0 = time.monotonic()
            held = asyncio.create_task(hold_the_budget(guard))
            await asyncio.sleep(0)
            if stop_at is not None:
                asyncio.get_running_loop().call_later(stop_at, guard.stop_reading)
            await guard({"type": "http", "method": "POST", "path": "/predict",
                         "headers": [(b"content-length", b"100")]}, stalled, send)
            await held
            assert guard.budget.used == 0
            return time.monotonic() - t0

        took = asyncio.run(scenario())
        return took, sent[0]["status"], json.loads(sent[1]["body"])["detail"]

    took, status, detail = answered_after(0.0, 0.5)
    assert status == 408 and 0.45 < took < 0.9 and "did not all arrive within 0.5 s of the request (0 bytes read)" in detail
    took, status, _ = answered_after(0.4, 0.5)  # waited 0.4 s: 0.1 s of its time left, but a 0.3 s read window
    assert status == 408 and 0.65 < took < 1.1, took
    took, status, detail = answered_after(0.0, 30, stop_at=0.1)  # stopping: 0.2 s more (seen within a second)
    assert status == 408 and took < 1.6 and detail == "the request body did not all arrive before the server stopped (0 bytes read)"


def test_decoders_end_with_a_killed_server(checkpoint, tmp_path):
    """kill -9 gives the server no time to stop its decoders: they notice and exit by themselves."""
    server = Server(checkpoint, tmp_path / "server.log")
    below = _descendants(server.proc.pid)
    assert len(below) >= 2
    server.stop(signal.SIGKILL)
    _end(below)


def test_a_crashed_decoder_is_replaced():
    """A decoder that dies (as a crash in an image library would) breaks its pool: the task is
    retried once in a fresh pool, then refused with a message; the next task is served."""
    import asyncio

    from bnlab.deploy.serve import Decoders

    async def scenario():
        decoders = Decoders(1, 10_000)
        try:
            with pytest.raises(payload.InputError, match="crashed a decoder process twice"):
                await decoders.run(os._exit, 1)
            return await decoders.run(payload.decoder_ready)
        finally:
            decoders.close()

    assert asyncio.run(scenario()) is True


def test_cli_refuses_bad_limits_before_starting(checkpoint):
    r = CliRunner().invoke(app, ["serve", str(checkpoint), "--max-image-pixels", "100"])
    assert r.exit_code == 2 and "max_image_pixels must be at least the model's input area, 784" in r.output
    r = CliRunner().invoke(app, ["serve", str(checkpoint), "--decoders", "0"])
    assert r.exit_code == 2 and "decoders must be at least 1" in r.output
    r = CliRunner().invoke(app, ["serve", str(checkpoint), "--body-seconds", "0"])
    assert r.exit_code == 2 and "body_seconds must be more than 0 (got 0.0)" in r.output


# ---------------------------------------------------------------- the limits, without a server

def test_json_limits_are_read_before_parsing():
    """Depth, token length and value count come from the bytes, strings excluded; escaped quotes
    and brackets inside strings do not count."""
    extent = payload._json_extent
    assert extent(b'{"a": "x[[[[", "b": [1, 22, [333]], "c": "\\"[[\\\\", "d": {}}') == (3, 3, 13)
    assert extent(b"") == (0, 0, 0)
    assert extent(b'"unterminated [[[[ \\') == (0, 2, 1)
    # an input that a pattern able to fail would rescan from every quote: quadratic; this one is linear
    start = time.perf_counter()
    extent(b'"' + b'\\"' * 1_000_000 + b"\\")
    assert time.perf_counter() - start < 2


def test_values_per_sample_matches_a_real_sample():
    """The value budget per sample equals the tokens plus lists of a real (1, 28, 28) sample's JSON."""
    text = json.dumps(DIGIT[None].tolist()).encode()
    assert payload._json_extent(text)[2] == payload._values_per_sample(SHAPE) == 1 + 1 + 28 + 784


def test_json_batch_limit_and_exact_values():
    raw = json.dumps({"inputs": DIGIT.tolist(), "prescaled": True}).encode()
    batch, prescaled, tf = payload.json_to_batch(raw, SHAPE, 4)
    assert not tf
    assert prescaled and batch.dtype == np.float32 and batch.shape == (1, *SHAPE)
    np.testing.assert_array_equal(batch[0, 0], DIGIT)
    full = json.dumps({"inputs": np.zeros((4, *SHAPE), int).tolist()}).encode()
    assert payload.json_to_batch(full, SHAPE, 4)[0].shape == (4, *SHAPE)
    with pytest.raises(payload.InputTooLarge, match="JSON values"):
        payload.json_to_batch(json.dumps({"inputs": np.zeros((5, *SHAPE), int).tolist()}).encode(), SHAPE, 4)
    with pytest.raises(payload.InputTooLarge, match=r"at most 4 samples per request \(got 5\)"):  # within the slack
        payload.json_to_batch(json.dumps({"inputs": np.zeros((5, 2), int).tolist()}).encode(), (2,), 4)


@pytest.mark.parametrize("make,value", [
    (lambda: Image.fromarray(np.full((28, 28), 60000, np.uint16)), round(60000 / 257)),
    (lambda: Image.new("CMYK", (28, 28), (0, 0, 0, 0)), 255),
    (lambda: Image.new("LA", (28, 28), (200, 0)), 200),
    (lambda: Image.new("1", (56, 56), 1), 255),
], ids=["png-16-bit", "cmyk", "grey-alpha", "1-bit"])
def test_image_modes_decode_to_raw_pixels(make, value):
    fmt = "JPEG" if make().mode == "CMYK" else "PNG"
    arr = payload.image_to_array(_image(make(), fmt), SHAPE)
    assert arr.shape == SHAPE and abs(float(arr.mean()) - value) <= 1


def test_image_limit_is_read_from_the_header():
    assert payload.default_max_image_pixels(SHAPE) == 4096 * 4096
    assert payload.default_max_image_pixels((3, 512, 512)) == 256 * 512 * 512
    with pytest.raises(payload.InputTooLarge, match="64,000,000 pixels; at most 16,777,216"):
        payload.image_to_array(BOMB, SHAPE)
    small = _png(100, 100, 100)
    assert payload.image_to_array(small, SHAPE, max_pixels=10_000).shape == SHAPE
    with pytest.raises(payload.InputTooLarge, match="at most 9,999"):
        payload.image_to_array(small, SHAPE, max_pixels=9_999)


def test_cli_predict_refuses_a_bomb(checkpoint, tmp_path):
    (tmp_path / "bomb.png").write_bytes(BOMB)
    r = CliRunner().invoke(app, ["predict", str(checkpoint), str(tmp_path / "bomb.png")])
    assert r.exit_code == 2 and "64,000,000 pixels" in r.output and "Traceback" not in r.output
