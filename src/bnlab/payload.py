"""Prediction inputs from untrusted bytes: a JSON body or an image file, turned into a float32
batch of the model's input shape within stated limits, or refused with an InputError that says
what was expected and what arrived.

The limits (one place; the server and ``bnlab serve --help`` quote these names):

- JSON is UTF-8; nesting at most ``MAX_JSON_DEPTH`` (8) levels deep (the deepest valid body, an
  object holding a batch of (C, H, W) samples, is 5); every number at most ``MAX_NUMBER_CHARS``
  (64) characters (a float64 written in full takes 24); no NaN/Infinity (not JSON); no duplicate
  keys; at most ``max_batch`` samples' worth of values. Depth, number length and value count are
  read off the bytes BEFORE parsing, so a 400-digit integer, a body nested 10,000 deep or a million
  empty lists cost one vectorised scan, never a Python object per token.
- Every value must be finite in float32, the model's dtype (1e39 and 1e400 are refused).
- Images: PNG, JPEG, BMP, GIF or WebP only; at most ``max_pixels`` pixels, read from the header
  BEFORE decoding (``default_max_image_pixels``: 16.8 million, or 256 times the model's input
  area if larger); an animation gives its first frame; EXIF orientation is applied; 16-bit grey is
  scaled to 0..255; alpha is dropped; the result is resized to the model's input.

Imports no torch: the server decodes in worker processes, which must start in a fraction of a
second (``decoder_setup`` prepares one).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import warnings
from collections import Counter
from itertools import chain
from typing import NamedTuple

import numpy as np

from bnlab.lifeline import die_with_parent

MAX_JSON_DEPTH = 8
MAX_NUMBER_CHARS = 64
MIN_IMAGE_PIXEL_LIMIT = 4096 * 4096  # a 12-16 MP phone photo of a digit is usable; decoding costs <= 64 MiB
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # PIL's names; no plugin beyond these sees the bytes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # the same formats as file names
_FORMAT_NAMES = "PNG, JPEG, BMP, GIF or WebP"


class InputError(ValueError):
    """An input that does not fit the model; the message says what was expected and what arrived."""


class UnreadableInput(InputError):
    """Bytes that cannot be read at all: not UTF-8, not JSON (the server answers 400)."""


class InputTooLarge(InputError):
    """An input over a size limit: samples, values or pixels (the server answers 413)."""


# ---------------------------------------------------------------- arrays

def accepted_forms(shape: tuple[int, ...], channels_last: bool):
    """Each accepted sample shape with the function that turns a batch of it into the model's layout:
    the model's own, then the same image in the other channel order (Keras holds images channels last,
    torch channels first), and a one-channel image without its channel axis."""
    forms = [(shape, lambda a: a)]
    if len(shape) == 2:  # a model taking (H, W) grey images (Keras): also (1, H, W)
        forms.append(((1, *shape), lambda a: a[:, 0]))
    if len(shape) == 3:
        if channels_last:  # a model imported from Keras: (H, W, C)
            h, w, c = shape
            forms.append(((c, h, w), lambda a: a.transpose(0, 2, 3, 1)))
            if c == 1:
                forms.append(((h, w), lambda a: a[..., None]))
        else:
            c, h, w = shape
            forms.append(((h, w, c), lambda a: a.transpose(0, 3, 1, 2)))
            if c == 1:
                forms.append(((h, w), lambda a: a[:, None]))
    return forms


def as_batch(arr, input_shape: tuple[int, ...], where: str = "input", *, channels_last: bool = False) -> np.ndarray:
    """Accept one sample or a batch (N, ...) of finite numbers in the model's layout, the other channel
    order, or (H, W) for one-channel images; return (N, *input_shape) float32 in the model's layout.
    ``channels_last``: the model takes (H, W, C) images (imported from Keras)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: expected numbers (got dtype {arr.dtype})")
    with np.errstate(over="ignore"):  # beyond float32's range -> inf, refused below
        arr = arr.astype(np.float32)
    shape = tuple(input_shape)
    forms = accepted_forms(shape, channels_last)
    for sample, to_model in forms:
        if arr.shape == sample:
            arr = to_model(arr[None])
            break
        if arr.ndim == len(sample) + 1 and arr.shape[1:] == sample and len(arr):
            arr = to_model(arr)
            break
    else:
        dims = lambda f: ", ".join(map(str, f))  # noqa: E731
        other = "".join(f", or {f} / (N, {dims(f)})" for f, _ in forms[1:])
        raise InputError(f"{where}: expected shape {shape} or (N, {dims(shape)}){other} (got {tuple(arr.shape)})")
    arr = np.ascontiguousarray(arr)
    if not np.isfinite(arr).all():
        raise InputError(f"{where}: contains NaN or infinite values (or values beyond float32's ±3.4e38)")
    return arr


_JSON_TYPES = {str: "a string", bool: "true/false", type(None): "null", dict: "an object", list: "an array",
               int: "a number", float: "a number"}


def _nested_numbers(value, where: str) -> np.ndarray:
    """A rectangular nested list of numbers -> float64 array; anything else is refused with what was
    found. Walks level by level (each level one C-speed pass), so no Python loop per number."""
    level, shape = [value], []
    while True:
        kinds = set(map(type, level))
        if kinds <= {int, float}:  # type(True) is bool: booleans are not numbers here
            return np.array(level, dtype=np.float64).reshape(shape)
        if kinds != {list}:
            odd = kinds - {list, int, float}
            found = (", ".join(sorted({_JSON_TYPES[k] for k in odd})) if odd
                     else "numbers next to lists")
            raise InputError(f"{where}: expected numbers in nested lists of one rectangular shape "
                             f"(found {found} at depth {len(shape) + 1})")
        lengths = set(map(len, level))
        if len(lengths) > 1:
            raise InputError(f"{where}: expected nested lists of one rectangular shape (lists of "
                             f"{min(lengths)} and {max(lengths)} items at depth {len(shape) + 1})")
        shape.append(lengths.pop())
        level = list(chain.from_iterable(level))


# ---------------------------------------------------------------- JSON

# A JSON string; an unterminated one runs to the end. It can never fail once it has seen its
# opening quote (every backslash takes the next byte, if any), so the scan is linear whatever the
# bytes: a pattern that can fail would rescan from every later quote, quadratic on '"\"\"\"...'.
_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S]?[^"\\]*)*(?:"|\Z)')
_SEPARATOR = np.zeros(256, bool)
_SEPARATOR[list(b"[]{},: \t\r\n")] = True


def _json_extent(raw: bytes) -> tuple[int, int, int]:
    """(nesting depth, longest token, number of values) of JSON bytes, strings excluded: a token is
    a number, a literal or an emptied string; values are tokens plus arrays and objects. Exact on
    valid JSON, an upper bound or harmless on invalid JSON (which the parser then refuses)."""
    a = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    opens = (a == ord("[")) | (a == ord("{"))
    step = opens.view(np.int8) - ((a == ord("]")) | (a == ord("}"))).view(np.int8)
    depth = int(np.cumsum(step, dtype=np.int32).max(initial=0))
    token = np.zeros(len(a) + 2, bool)  # padded with a separator at both ends
    token[1:-1] = ~_SEPARATOR[a]
    edges = np.flatnonzero(token[1:] != token[:-1])
    starts, ends = edges[::2], edges[1::2]  # a token is [start, end)
    return depth, int((ends - starts).max(initial=0)), len(starts) + int(opens.sum())


def _values_per_sample(input_shape: tuple[int, ...]) -> int:
    """Lists and numbers in one sample written as nested lists: for (1, 28, 28), 1 + 1 + 28 + 784."""
    return sum(math.prod(input_shape[:k]) for k in range(len(input_shape) + 1))


def _refuse_constant(name: str):
    raise InputError(f"{name} is not a JSON number: inputs must be finite numbers")


def _unique_keys(pairs: list) -> dict:
    body = dict(pairs)
    if len(body) != len(pairs):
        twice = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise InputError(f"duplicate key(s) {', '.join(_quote(k) for k in twice[:5])} in a JSON object")
    return body


def _quote(text: str, limit: int = 40) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "...")


SERVING_SIGNATURE = "serving_default"  # TF Serving's default signature name, the only one served


class Decoded(NamedTuple):
    batch: np.ndarray  # (N, *input_shape) float32
    prescaled: bool
    tf_serving: bool  # the body was TF Serving's {"instances": [...]}: answer {"predictions": [...]}


def json_to_batch(raw: bytes, input_shape: tuple[int, ...], max_batch: int, channels_last: bool = False) -> Decoded:
    """A JSON body ``{"inputs": one sample or a batch, "prescaled": false}``, or TF Serving's row format
    ``{"instances": [sample, ...], "signature_name": "..."}`` (a batch; the signature is not used), ->
    ``Decoded``, within the limits of the module docstring."""
    shape = tuple(input_shape)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableInput(f"the body is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    depth, longest, values = _json_extent(raw)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"the JSON is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted "
                         f"(a batch of samples of shape {shape} needs {len(shape) + 2})")
    if longest > MAX_NUMBER_CHARS:
        raise InputError(f"a number (or bare token) of {longest} characters; numbers are limited to "
                         f"{MAX_NUMBER_CHARS} characters")
    most = max_batch * _values_per_sample(shape) + 8  # + the object, its keys and "prescaled"
    if values > most:
        raise InputTooLarge(f"the body holds {values:,} JSON values; at most {most:,} are accepted "
                            f"({max_batch} samples of shape {shape})")
    try:
        body = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise UnreadableInput(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise InputError('expected a JSON object {"inputs": [...], "prescaled": false} '
                         f"(got {_JSON_TYPES[type(body)]})")
    tf = "instances" in body
    allowed = {"instances", "signature_name", "prescaled"} if tf else {"inputs", "prescaled"}
    unknown = sorted(body.keys() - allowed)
    if unknown:
        raise InputError(f"unexpected key(s) {', '.join(map(_quote, unknown))}: the body takes \"inputs\" "
                         "and optionally \"prescaled\" (or TF Serving's \"instances\" and \"signature_name\")")
    if "inputs" not in body and not tf:
        raise InputError('missing "inputs": expected {"inputs": one sample or a batch} or {"instances": [...]}')
    prescaled = body.get("prescaled", False)
    if not isinstance(prescaled, bool):
        raise InputError(f"prescaled must be true or false (got {json.dumps(prescaled)[:40]})")
    signature = body.get("signature_name", SERVING_SIGNATURE)
    if tf and signature != SERVING_SIGNATURE:
        raise InputError(f"signature_name: this server has one signature, {json.dumps(SERVING_SIGNATURE)} "
                         f"(got {json.dumps(signature)[:60]})")
    key = "instances" if tf else "inputs"
    batch = as_batch(_nested_numbers(body[key], key), shape, key, channels_last=channels_last)
    if len(batch) > max_batch:
        raise InputTooLarge(f"at most {max_batch} samples per request (got {len(batch)})")
    return Decoded(batch, prescaled, tf)


# ---------------------------------------------------------------- images

def default_max_image_pixels(input_shape: tuple[int, ...]) -> int:
    """The image size limit for a model: 4096² pixels, or 256 times its input area if larger."""
    h, w = input_shape[-2:]
    return max(MIN_IMAGE_PIXEL_LIMIT, 256 * h * w)


def image_to_array(data: bytes, input_shape: tuple[int, ...], max_pixels: int | None = None,
                   channels_last: bool = False) -> np.ndarray:
    """Image bytes -> (C, H, W) float32 array of raw pixel values 0..255 ((H, W, C) for a ``channels_last``
    model), resized to the model's input.

    The size is checked from the header before any pixel is decoded (``max_pixels``; default
    ``default_max_image_pixels``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(input_shape) != 3:
        raise InputError(f"this model takes feature vectors of shape {tuple(input_shape)}, not images")
    h, w, c = input_shape if channels_last else (input_shape[1], input_shape[2], input_shape[0])
    max_pixels = max_pixels or default_max_image_pixels(input_shape)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header only
        width, height = img.size
        if width * height > max_pixels:
            raise InputTooLarge(f"an image of {width}×{height} = {width * height:,} pixels; at most "
                                f"{max_pixels:,} are accepted")
        img.draft("L" if c == 1 else "RGB", (w, h))  # JPEG: decode at 1/2..1/8 scale when that suffices
        img.load()  # the first frame of an animation
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: PIL's convert would clip at 255
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8))
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
        img = img.convert("L" if c == 1 else "RGB")  # alpha dropped
        if img.size != (w, h):
            img = img.resize((w, h), reducing_gap=3.0)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own guard (see decoder_setup)
        raise InputTooLarge(f"{e} (at most {max_pixels:,} pixels are accepted)") from None
    except UnidentifiedImageError:
        raise InputError(f"the bytes are not an image of an accepted format ({_FORMAT_NAMES}): PIL "
                         "recognised none of them") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on malformed files (OSError,
        # ValueError, SyntaxError, EOFError, struct.error...): each means these bytes are no usable image
        raise InputError(f"the bytes are not an image PIL can read as {_FORMAT_NAMES} "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    arr = np.asarray(img, dtype=np.float32)  # (H, W) or (H, W, 3)
    if c == 1:
        return arr[..., None] if channels_last else arr[None]
    return arr if channels_last else arr.transpose(2, 0, 1)


def image_to_batch(data: bytes, input_shape: tuple[int, ...], max_pixels: int | None = None,
                   channels_last: bool = False):
    """``image_to_array`` as a batch of one, with (batch, prescaled) as ``json_to_batch`` gives them."""
    return image_to_array(data, input_shape, max_pixels, channels_last)[None], False


# ---------------------------------------------------------------- decoder processes

def decoder_setup(parent_pid: int, max_image_pixels: int) -> None:
    """Prepare a decoding process of the server (a ProcessPoolExecutor initializer).

    - Ctrl-C in a terminal signals the whole process group: the server, not the decoder, decides
      when decoding stops (it finishes the requests in flight first).
    - Decoding is bulk work: it runs at a lower priority (nice +5), so on a busy machine the
      server's event loop (/health, moving bytes) gets a core first.
    - PIL's own decompression-bomb guard stays on as a second line, never below our limit (so our
      message, with the image's size, is the one a client reads), and its warning is an error (the
      process serves only this: PIL's global settings are its own).
    - The process dies with the server, even one killed by kill -9 that had no time to say so
      (``bnlab.lifeline``, the rule every child of bnlab follows; first, before PIL is imported).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    from PIL import Image

    os.nice(5)
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_image_pixels)
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decoder_ready() -> bool:
    """A no-op task: the server submits one per process at start, so the first request waits for nothing."""
    return True
