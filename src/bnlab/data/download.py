"""Finding dataset files: a folder given by the user, the cache, or a checksummed download.

Order: ``data_dir`` (files placed by hand, checked by their format when read), then the cache
folder (``$BNLAB_DATA`` or the platform cache dir; files there were verified on download and are
verified again), then each mirror in turn. A download whose MD5 does not match is deleted and
reported. With no file and no network, the error lists the exact file names and the folders
where they can be put.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from bnlab.hashing import file_digest


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str
    urls: tuple[str, ...]  # mirrors, tried in order


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not here and could not be downloaded."""


class ChecksumError(RuntimeError):
    """A downloaded file's checksum did not match; the file was deleted."""


def cache_dir() -> Path:
    """``$BNLAB_DATA`` if set, else the platform's user cache folder for bnlab."""
    env = os.environ.get("BNLAB_DATA")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("bnlab")) / "data"


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def _download(file: RemoteFile, dest: Path, timeout: float) -> list[str]:
    """Try each mirror; return the list of failures (empty on success)."""
    failures = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for url in file.urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as out:
                shutil.copyfileobj(r, out)
        except OSError as e:
            failures.append(f"{url}: {e}")
            part.unlink(missing_ok=True)
            continue
        got = md5sum(part)
        if got != file.md5:
            part.unlink(missing_ok=True)
            failures.append(f"{url}: checksum mismatch (md5 {got}, expected {file.md5}); the file was deleted")
            continue
        part.replace(dest)  # atomic: a half-written file never carries the final name
        return []
    return failures


def locate(dataset: str, files: list[RemoteFile], *, data_dir: str | Path | None = None,
           download: bool = True, timeout: float = 60.0) -> dict[str, Path]:
    """Paths of all ``files`` of ``dataset``, downloading what is missing."""
    found: dict[str, Path] = {}
    cache = cache_dir() / dataset
    hand = [Path(data_dir).expanduser() / dataset, Path(data_dir).expanduser()] if data_dir else []
    problems: list[str] = []
    for f in files:
        placed = next((d / f.name for d in hand if (d / f.name).is_file()), None)
        if placed is not None:
            found[f.name] = placed
            continue
        cached = cache / f.name
        if cached.is_file():
            if md5sum(cached) == f.md5:
                found[f.name] = cached
                continue
            cached.unlink()
            problems.append(f"{cached}: checksum mismatch, deleted")
        if download:
            failures = _download(f, cached, timeout)
            if not failures:
                found[f.name] = cached
                continue
            problems.extend(failures)
            if any("checksum mismatch" in p for p in failures) and len(failures) == len(f.urls):
                raise ChecksumError(f"{dataset}: every download of {f.name} had the wrong checksum:\n  "
                                    + "\n  ".join(failures))
    missing = [f for f in files if f.name not in found]
    if missing:
        places = [str(p) for p in hand[:1]] + [str(cache)]
        raise DatasetUnavailable(
            f"dataset {dataset!r} is not available offline: missing "
            + ", ".join(f.name for f in missing)
            + ".\nDownload them from " + " or ".join(sorted({u.rsplit('/', 1)[0] for f in missing for u in f.urls}))
            + f"\nand put them in {' or '.join(places)}"
            + (" (or pass --data-dir DIR)" if not data_dir else "")
            + (".\nDownload attempts:\n  " + "\n  ".join(problems) if problems else ".")
        )
    return found
