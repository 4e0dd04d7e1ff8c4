"""Atomic file output: every artifact is written to a temporary name, then renamed.

A killed stage therefore never leaves a half-written file under the final name, and DVC
never caches a truncated output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (so a lock or temp file it holds is not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _sweep_stale_temps(final: Path) -> None:
    """Remove temporaries of ``final`` left by killed writers (their pid, in the name, is gone).

    A SIGKILL skips the ``finally`` below, so without this every killed run would leave a
    ``.name.<pid>.<random>.tmp`` beside its output for good. Live writers' files are kept.
    """
    prefix = f".{final.name}."
    for stale in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = stale.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def _temp_beside(final: Path) -> Path:
    """An empty ``.name.<pid>.<random>.tmp`` beside ``final`` (its folder made, dead writers' temporaries swept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp_name)


def _usual_permissions(tmp: Path) -> None:
    """mkstemp makes 0600; outputs get the permissions the umask gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    if tmp.exists():
        os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    tmp = _temp_beside(final)
    try:
        yield tmp
        _usual_permissions(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_create(path: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`atomic_path` for a file several processes may create at once (a local MLflow store):
    the block's complete file is linked into place only if ``path`` does not exist by then
    (``os.link`` never replaces), so the first one made stays and a later one is dropped."""
    final = Path(path)
    tmp = _temp_beside(final)
    try:
        yield tmp
        _usual_permissions(tmp)
        with contextlib.suppress(FileExistsError):  # another process created it first: theirs is kept
            os.link(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; NaN or inf is refused (it is not JSON, and DVC cannot diff it)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as exc:  # NaN / inf: a diverged or degenerate result reached the output
        raise ValueError(f"not writing {path}: {exc} (a metric is NaN or infinite)") from exc
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Save arrays to an uncompressed ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save one array to ``.npy`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


#: The resolution every figure is written at (and laid out at, where text is placed by measuring it).
FIGURE_DPI = 120


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure as PNG atomically; returns the path (for logging it as an artifact)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return Path(path)


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` atomically (checkpoints survive a kill mid-write)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_error_reason(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` refused a file.

    A file holding pickled objects other than tensors and plain containers (a crafted pickle, or
    a whole module saved by other code) is refused by torch's restricted unpickler before any of
    it runs; its many-line message is cut to the global it refused.
    """
    text = str(exc)
    if "Weights only load failed" in text:
        refused = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        return f"it holds pickled objects, not only tensors; weights_only loading refused it: {refused}"[:240]
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:240]


def load_torch(path: str | os.PathLike[str], *, what: str, missing_fix: str, redo: str) -> Any:
    """``torch.load`` (weights only, to CPU) of a file this project wrote, naming the file and the fix.

    A missing file says ``missing_fix``; an unreadable one (truncated, foreign) says it is not a
    readable ``what`` file and to delete it and ``redo``.
    """
    import torch

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: {missing_fix}.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{p} is not a readable {what} file ({load_error_reason(exc)}); delete it and {redo}.") from exc


def load_npz(path: str | os.PathLike[str], required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load an ``.npz`` fully into memory, naming the file and the fix when it is missing or broken."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: run the stage that produces it (dvc repro).")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError ...
        raise ValueError(f"{p} is not a readable .npz ({exc}); delete it and rerun its stage.") from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f"{p} lacks arrays {missing} (has {sorted(arrays)}); rerun its stage.")
    return arrays


def read_json(path: str | os.PathLike[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a JSON object this project wrote, naming the file and the fix when it is missing or broken."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist: run the stage that produces it (dvc repro).")
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p} is not readable JSON ({exc}); delete it and rerun its stage.") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{p} must hold a JSON object, has {type(obj).__name__}; delete it and rerun its stage.")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{p} lacks keys {missing} (has {sorted(obj)}); rerun its stage.")
    return obj


def open_npy(path: str | os.PathLike[str], *, redo: str) -> np.ndarray:
    """Memory-map an ``.npy`` file; a truncated or foreign file is refused naming it and ``redo``."""
    p = Path(path)
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # ValueError (mmap length, header), OSError, EOFError ...
        raise ValueError(f"{p} is not a readable .npy ({exc}); delete it and {redo}.") from exc


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; it replaces ``path`` only if the block succeeds.

    Directory outputs (a prepared dataset, a corruption set) are then either complete or absent.
    """
    import shutil

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
