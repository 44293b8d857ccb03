"""Finding dataset files: a folder given by the user, the cache, or a checksummed download.

Order: ``data_dir`` (files placed by hand), then the cache folder (``$BNLAB_DATA`` or the
platform cache dir), then each mirror in turn. Every file found is verified on every load
against its published MD5.

Whose files may be deleted: only bnlab's own. Each dataset's cache folder keeps a manifest
(``downloads.json``: name, md5, size, url of every file bnlab downloaded there); a file it lists
whose MD5 no longer matches is deleted and downloaded again. Any other file with a mismatch, in
``data_dir`` or placed in the cache folder by hand, is the user's: it is never deleted, and the
ChecksumError names the file, its MD5, the expected MD5 and what to do. (A file the manifest lists
counts as bnlab's even if the user replaced it since; replace files in ``data_dir`` instead.)
With no file and no network, the error lists the exact file names and the folders where they can
be put.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from bnlab.hashing import file_digest

MANIFEST = "downloads.json"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str
    urls: tuple[str, ...]  # mirrors, tried in order


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not here and could not be downloaded."""


class ChecksumError(RuntimeError):
    """A dataset file whose MD5 is not the published one (deleted only if bnlab downloaded it)."""


def cache_dir() -> Path:
    """``$BNLAB_DATA`` if set, else the platform's user cache folder for bnlab."""
    env = os.environ.get("BNLAB_DATA")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("bnlab")) / "data"


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


# ---------------------------------------------------------------- the manifest of bnlab's downloads

def downloaded_by_bnlab(folder: Path) -> dict[str, dict]:
    """name -> {md5, size, url, time} of the files bnlab downloaded into ``folder``. An unreadable
    manifest lists nothing: then no file there counts as bnlab's, and none is deleted."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _set_manifest(folder: Path, name: str, entry: dict | None) -> None:
    """Record (or, with None, forget) one download, replacing the manifest atomically."""
    files = downloaded_by_bnlab(folder)
    if entry is None:
        files.pop(name, None)
    else:
        files[name] = entry
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=2), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


# ---------------------------------------------------------------- verifying and downloading

def _mismatch_message(path: Path, got: str, file: RemoteFile, where: str) -> str:
    sources = " or ".join(file.urls)
    return (f"{path}: checksum mismatch: md5 {got} ({path.stat().st_size} bytes), expected {file.md5}. "
            f"bnlab did not download this file ({where}), so it is left as it is: replace it with the original "
            f"{file.name} from {sources}, or remove it"
            + (" (bnlab then downloads it into its cache)" if where == "placed in the cache folder by hand"
               else " from there (bnlab then uses its cache or downloads it)"))


def _download(file: RemoteFile, dest: Path, timeout: float) -> list[str]:
    """Try each mirror; return the list of failures (empty on success, the file then recorded as bnlab's)."""
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
        # recorded first: a file under the final name is then always one the manifest knows
        _set_manifest(dest.parent, file.name, {"md5": got, "size": part.stat().st_size, "url": url,
                                                "time": time.time()})
        part.replace(dest)  # atomic: a half-written file never carries the final name
        return []
    return failures


def locate(dataset: str, files: list[RemoteFile], *, data_dir: str | Path | None = None,
           download: bool = True, timeout: float = 60.0) -> dict[str, Path]:
    """Paths of all ``files`` of ``dataset``, each verified by MD5, downloading what is missing."""
    found: dict[str, Path] = {}
    cache = cache_dir() / dataset
    hand = [Path(data_dir).expanduser() / dataset, Path(data_dir).expanduser()] if data_dir else []
    problems: list[str] = []
    for f in files:
        placed = next((d / f.name for d in hand if (d / f.name).is_file()), None)
        if placed is not None:
            got = md5sum(placed)
            if got != f.md5:
                raise ChecksumError(_mismatch_message(placed, got, f, "it is in --data-dir, the user's folder"))
            found[f.name] = placed
            continue
        cached = cache / f.name
        if cached.is_file():
            got = md5sum(cached)
            if got == f.md5:
                found[f.name] = cached
                continue
            if f.name not in downloaded_by_bnlab(cache):
                raise ChecksumError(_mismatch_message(cached, got, f, "placed in the cache folder by hand"))
            cached.unlink()
            _set_manifest(cache, f.name, None)
            problems.append(f"{cached}: checksum mismatch (md5 {got}, expected {f.md5}); bnlab had downloaded "
                            "it, so it was deleted")
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
