"""Checksummed, resumable HTTP downloads: the one way datasets come onto the machine.

A partial file (``<dest>.part``) is continued with an HTTP Range request; the file gets its final
name only once its MD5 matches, so a killed download resumes and a corrupted one never passes.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-")


def md5sum(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks (archives can be larger than memory allows comfortably)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, part: Path, *, chunk_size: int, progress: bool, timeout: float, desc: str) -> None:
    """Append the rest of ``url`` to ``part`` (resuming from its size); restart if the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing past the end: the part already holds the whole file (the checksum decides)
        raise
    with resp:
        if offset:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if resp.status != 206 or match is None or int(match.group(1)) != offset:
                offset = 0  # the server sent the whole file (or another range): start over
        length = resp.headers.get("Content-Length")
        total = int(length) + offset if length is not None else None
        with open(part, "ab" if offset else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=desc, disable=not progress
        ) as bar:
            for block in iter(lambda: resp.read(chunk_size), b""):
                fh.write(block)
                bar.update(len(block))


def download_file(
    url: str,
    dest: Path,
    md5: str,
    *,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    timeout: float = 60.0,
    url_key: str = "data.url",
) -> Path:
    """Download ``url`` to ``dest`` and verify its MD5; return ``dest``.

    Nothing is fetched when ``dest`` already holds a file with checksum ``md5``. An interrupted
    download leaves ``<dest>.part``, which the next call continues with ``Range: bytes=<size>-``
    (and restarts from zero if the server answers 200). ``dest`` appears only after the checksum
    matched, so a file under the final name is always a verified one. ``url_key`` is the params key
    that sets ``url``: the messages name it as the fix.
    """
    dest = Path(dest)
    md5 = md5.lower()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        got = md5sum(dest, chunk_size)
        if got == md5:
            return dest
        # Only a hand-placed or foreign file can sit here (we rename after verifying): never delete it.
        raise ValueError(
            f"{dest} exists but its md5 is {got}, not the expected {md5} for {url}; "
            f"delete it to download again, or if it is the archive you want, pass its md5 instead"
        )
    part = dest.with_name(dest.name + ".part")
    hint = f"set {url_key} in params.yaml to a reachable mirror, or download {url} by hand and place it at {dest}"
    try:
        _fetch(url, part, chunk_size=chunk_size, progress=progress, timeout=timeout, desc=dest.name)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"download of {url} failed (HTTP {exc.code} {exc.reason}); {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: a malformed URL
        kept = f"; {part} keeps what arrived and a rerun resumes from it" if part.exists() else ""
        raise RuntimeError(f"download of {url} failed ({exc}){kept}; {hint}") from None
    got = md5sum(part, chunk_size)
    if got != md5:
        part.unlink()
        raise ValueError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {got}; the download was deleted. "
            f"Rerun to download again; if the server holds a different archive, point {url_key} at the official one "
            f"or place the right file at {dest}"
        )
    part.replace(dest)
    return dest


def check_members(members: list[tarfile.TarInfo], archive: Path, folder: str, *, fix: str) -> None:
    """Refuse an archive holding anything but plain files and folders under ``folder/``.

    The official archives hold nothing else; a member with an absolute path, a ``..``, a link or a
    device is a crafted (or foreign) archive, refused whole before anything is written (an
    extraction's ``filter="data"`` would still keep such members inside the target folder).
    ``fix`` ends the message: which setting points at the official archive.
    """
    bad = []
    for m in members:
        parts = PurePosixPath(m.name).parts
        if (m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != folder
                or not (m.isfile() or m.isdir())):
            bad.append(m.name + (f" -> {m.linkname}" if m.issym() or m.islnk() else ""))
    if bad:
        raise ValueError(
            f"{archive} holds {len(bad)} member(s) outside {folder}/ or that are links or devices "
            f"({', '.join(map(repr, bad[:3]))}): refusing to extract it (nothing was written); delete it and {fix}"
        )
