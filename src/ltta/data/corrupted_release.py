"""The official CIFAR-10-C / CIFAR-100-C releases (Hendrycks & Dietterich, ICLR 2019), fetched and unpacked.

Every published CIFAR-C number (RobustBench, DequanWang/tent, TTAB) was measured on these files, so a
result meant to sit beside them must be measured on them too, not on our generator's re-creation.
Each release is one uncompressed tar on Zenodo (record 2535967: ``CIFAR-10-C.tar``, 3555552:
``CIFAR-100-C.tar``; MD5s as the records list them) holding ``<folder>/<corruption>.npy`` (19
corruptions, uint8 [50000,32,32,3], severity s in rows [(s-1)*10000, s*10000)) and
``<folder>/labels.npy``: the layout :mod:`ltta.corruptions.cifar_c` reads.

The archive comes through :func:`~ltta.data.download.download_file` (resumable, MD5-checked, renamed
only when whole). Only the members asked for are unpacked, each to a temporary name renamed once
complete, so a killed unpacking never leaves a short ``.npy`` under its final name, and a rerun
unpacks only what is missing. As for the CIFAR archives, a member outside the release folder, a
link or a device refuses the archive before anything is written.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ltta.corruptions.cifar_c import LABELS_FILE
from ltta.data.download import check_members, download_file


@dataclass(frozen=True)
class Release:
    """Where one official corrupted release lives and what it is."""

    url: str
    md5: str
    folder: str
    record: str  # the DOI users cite

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


#: The releases, by the data source whose test set they corrupt (Zenodo v1 of each record; 2,918,471,680
#: and 2,918,473,216 bytes).
RELEASES: dict[str, Release] = {
    "cifar10": Release("https://zenodo.org/records/2535967/files/CIFAR-10-C.tar", "56bf5dcef84df0e2308c6dcbcbbd8499",
                       "CIFAR-10-C", "10.5281/zenodo.2535967"),
    "cifar100": Release("https://zenodo.org/records/3555552/files/CIFAR-100-C.tar", "11f0ed0f1191edbf9fa23466ae6021d3",
                        "CIFAR-100-C", "10.5281/zenodo.3555552"),
}


@dataclass(frozen=True)
class FetchedRelease:
    """An unpacked release: its folder (the CIFAR-C layout) and what identifies it in a report."""

    folder: Path
    dataset: str
    url: str
    archive: str
    md5: str
    record: str

    def provenance(self) -> dict[str, str]:
        """What the report and MLflow record: enough to name the exact files measured on."""
        return {"source": "official", "dataset": self.dataset, "record": self.record, "url": self.url,
                "archive": self.archive, "md5": self.md5}


def release_for(dataset: str) -> Release:
    """The release of ``dataset``; other datasets have none (their corrupted sets are generated)."""
    try:
        return RELEASES[dataset]
    except KeyError:
        raise ValueError(
            f"no official corrupted release for data source {dataset!r} (there are: {', '.join(RELEASES)}); "
            f"set corruptions.source=generated to corrupt its test set with the generator"
        ) from None


def _release_url(release: Release, url: str | None) -> str:
    """``url`` names the archive itself or a mirror's folder holding the official file name."""
    if not url:
        return release.url
    return url if url.endswith(".tar") else url.rstrip("/") + "/" + release.archive


def fetch_release(dataset: str, root: Path, names: Sequence[str], *, url: str | None = None, md5: str | None = None,
                  progress: bool = True) -> FetchedRelease:
    """Download (or find) ``dataset``'s official corrupted release under ``root`` and unpack ``names``.

    ``url`` replaces Zenodo's address (a mirror, or a test's server) and ``md5`` the record's checksum
    (only for a mirror that serves another archive). Returns the folder holding ``<name>.npy`` for
    every name and ``labels.npy``.
    """
    release = release_for(dataset)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    source = _release_url(release, url)
    digest = (md5 or release.md5).lower()
    archive = download_file(source, root / release.archive, digest, progress=progress, url_key="corruptions.url")
    folder = unpack_release(archive, root, release.folder, names)
    return FetchedRelease(folder, dataset, source, release.archive, digest, release.record)


def unpack_release(archive: Path, root: Path, folder: str, names: Sequence[str]) -> Path:
    """Unpack ``<folder>/<name>.npy`` for ``names`` and ``<folder>/labels.npy`` from ``archive`` into ``root``.

    A file already there with its member's size is kept (a rerun unpacks only what is missing);
    each member is written to ``.<name>.partial`` and renamed when complete.
    """
    wanted = [f"{n}.npy" for n in names] + [LABELS_FILE]
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            check_members(members, archive, folder, fix="point corruptions.url at the official release")
            by_name = {PurePosixPath(m.name).relative_to(folder).as_posix(): m for m in members if m.isfile()}
            missing = [w for w in wanted if w not in by_name]
            if missing:
                raise ValueError(
                    f"{archive} lacks {folder}/{{{', '.join(missing)}}}: it is not the official release (or not all "
                    f"of it); delete it and rerun, or point corruptions.url at the official one"
                )
            out = Path(root) / folder
            out.mkdir(parents=True, exist_ok=True)
            for w in wanted:
                member, dest = by_name[w], out / w
                if dest.is_file() and dest.stat().st_size == member.size:
                    continue
                tmp = out / f".{w}.partial"
                source = tar.extractfile(member)
                if source is None:  # a plain file always has a stream; guard the type, not a real case
                    raise ValueError(f"{archive}: member {member.name} cannot be read")
                with source, open(tmp, "wb") as fh:
                    shutil.copyfileobj(source, fh, 1 << 22)
                os.replace(tmp, dest)
    except (tarfile.TarError, EOFError) as exc:
        raise ValueError(f"{archive} could not be unpacked ({exc}); delete it and rerun to download it again") from None
    return out
