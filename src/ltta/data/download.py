"""Checksummed, resumable HTTP downloads: the one way datasets come onto the machine.

A partial file (``<dest>.part``) is continued with an HTTP Range request; the file gets its final
name only once its MD5 matches, so a killed download resumes and a corrupted one never passes.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm


def md5sum(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str, *, chunk_size: int = 1 << 20, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless it is already there with checksum ``md5``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if md5sum(dest) == md5:
            return dest
        dest.unlink()  # a stale or corrupted copy: fetch again
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if offset and resp.status != 206:  # the server ignored Range: start over
                offset = 0
            total = resp.headers.get("Content-Length")
            total_bytes = int(total) + offset if total is not None else None
            mode = "ab" if offset else "wb"
            with open(part, mode) as fh, tqdm(
                total=total_bytes, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                for block in iter(lambda: resp.read(chunk_size), b""):
                    fh.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and part.exists():  # range past the end: the part is complete
            pass
        else:
            raise RuntimeError(
                f"download of {url} failed (HTTP {exc.code}); set data.url to a mirror, or place the file at {dest}"
            ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(
            f"download of {url} failed ({exc}); rerun to resume, set data.url to a mirror, or place the file at {dest}"
        ) from None
    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise ValueError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {got}; the partial file was deleted, rerun to download again"
        )
    part.replace(dest)
    return dest
