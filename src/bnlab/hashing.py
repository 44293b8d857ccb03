"""Digests: of files, read in 1 MiB blocks (downloads are checked by MD5, checkpoints by SHA-256),
and of JSON values in one canonical form (sorted keys, no spaces, UTF-8, no NaN), so the same
value always has the same digest whatever the key order or indentation it was written with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(value) -> bytes:
    """The one byte form of a JSON value that its digest is taken over (NaN / infinity are not JSON:
    a ValueError)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def json_digest(value, algorithm: str = "sha256") -> str:
    return hashlib.new(algorithm, canonical_json(value)).hexdigest()
