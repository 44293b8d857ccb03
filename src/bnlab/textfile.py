"""Reading a small text file a user hands to bnlab (a spec), with one error per way it can be wrong."""

from __future__ import annotations

from pathlib import Path

MAX_TEXT_BYTES = 1 << 20  # a spec is a few hundred bytes; a bigger file is a wrong file


class TextFileError(ValueError):
    """A file that is not a readable, small UTF-8 text file; the message says which."""


def read_text_file(path: Path, kind: str = "TOML") -> str:
    """The text of ``path``: a regular file of at most 1 MiB of UTF-8 (``kind`` names the format in
    the errors). The caller says what a missing file means."""
    if not path.is_file():
        raise TextFileError(f"{path}: expected a {kind} file, but it is a directory or a special file")
    try:
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise TextFileError(f"{path}: a spec file is at most {MAX_TEXT_BYTES:,} bytes (this one has {size:,})")
        data = path.read_bytes()
    except OSError as e:
        raise TextFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                            f"{kind} files are UTF-8") from None
