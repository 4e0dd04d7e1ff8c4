"""Loading the reference generator of CIFAR-10-C for :mod:`corruption_reference` (the comparison).

The reference is hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (Hendrycks &
Dietterich, ICLR 2019), from the user's checkout. That script runs its whole CIFAR generation at
import time, so it is read with :mod:`ast`: only its imports, function and class definitions (and
the ctypes signature it declares for ImageMagick's motion blur) are executed, in a private
namespace. Names in that namespace are then rebound to thin compatibility shims, ours, for APIs
that newer libraries dropped or changed (:func:`_install_shims`); nothing global is monkeypatched
except a module alias for ``scipy.ndimage.interpolation`` when that SciPy module no longer exists.

Also here: the reference driver's per-image loop (:func:`reference_corrupt`) and the replay of its
random draws into ours (:data:`SHARED_DRAWS`), which turns elastic into a pixel comparison.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltta.corruptions import ALL_CORRUPTIONS  # noqa: E402
from ltta.runtime import to_float_nchw  # noqa: E402

REFERENCE_SCRIPT = "make_cifar_c.py"
#: The corruptions that call ImageMagick through Wand: skipped, and said so, without it.
WAND_DEPENDENT = ("motion_blur", "snow")


class _ModuleShim(types.ModuleType):
    """A module stand-in: the given attributes override, everything else comes from ``module``.

    Used to give the reference's functions a numpy / skimage / cv2 whose few dropped or changed
    calls behave as they did for the reference, without touching the real modules.
    """

    def __init__(self, module: types.ModuleType, **overrides: Any) -> None:
        super().__init__(module.__name__, getattr(module, "__doc__", None))
        self._wrapped = module
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


def _numpy_shim() -> types.ModuleType:
    """``np.float_`` (removed in NumPy 2.0) and the binary mode of ``np.fromstring`` (removed in
    NumPy 2.3), both as the reference used them: float64 and a copy of the raw bytes."""

    def fromstring(string: Any, dtype: Any = float, count: int = -1, sep: str = "") -> np.ndarray:
        if sep:
            return np.fromstring(string, dtype=dtype, count=count, sep=sep)
        return np.frombuffer(string, dtype=dtype, count=count).copy()

    return _ModuleShim(np, float_=np.float64, fromstring=fromstring)


def _gaussian_shim(gaussian: Callable[..., Any]) -> Callable[..., Any]:
    """``skimage.filters.gaussian(multichannel=True)`` became ``channel_axis=-1`` (0.19; the old
    keyword was removed in 0.21). The reference passes multichannel only for HxWx3 images."""

    def wrapped(image: Any, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> Any:
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)

    return wrapped


def _skimage_shim(skimage: types.ModuleType) -> types.ModuleType:
    """``skimage.util.random_noise`` no longer draws from NumPy's global generator (0.19+ uses an
    unseeded ``default_rng`` unless given ``rng``), so ``np.random.seed`` would not fix impulse
    noise. The shim seeds it from the global generator, keeping the reference run reproducible."""
    util = skimage.util

    def random_noise(image: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("rng", np.random.default_rng(np.random.randint(0, 2**31 - 1)))
        return util.random_noise(image, *args, **kwargs)

    return _ModuleShim(skimage, util=_ModuleShim(util, random_noise=random_noise))


def _cv2_shim(cv2: types.ModuleType, folder: Path) -> types.ModuleType:
    """frost reads ``./frostN.png`` relative to the working directory; resolve such paths against
    the reference's own folder so the benchmark runs from anywhere."""

    def imread(filename: str, *args: Any) -> Any:
        path = Path(filename)
        if not path.is_absolute():
            path = folder / path
        img = cv2.imread(str(path), *args)
        if img is None:
            raise FileNotFoundError(f"the reference generator reads {path}, which is missing from the checkout")
        return img

    return _ModuleShim(cv2, imread=imread)


def _ensure_scipy_interpolation() -> None:
    """``scipy.ndimage.interpolation`` is deprecated (SciPy 1.8) and goes in 2.0; alias it to
    ``scipy.ndimage`` only when it is gone."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module("scipy.ndimage.interpolation")
    except ImportError:
        sys.modules["scipy.ndimage.interpolation"] = importlib.import_module("scipy.ndimage")


def _wand_available() -> tuple[bool, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("wand.image")
        return True, ""
    except Exception as exc:  # ImportError, or wand's own error when MagickWand is missing
        return False, f"{type(exc).__name__}: {exc}"


def _mentions_wand(node: ast.stmt) -> bool:
    return "wand" in ast.unparse(node).lower()


def _definitions_only(source: str, filename: str, keep_wand: bool) -> ast.Module:
    """The script's imports, function/class definitions and attribute assignments (the ctypes
    ``argtypes`` declaration), dropping its driver: the dataset load, the loops and the saves."""
    tree = ast.parse(source, filename)
    keep: list[ast.stmt] = []
    for node in tree.body:
        is_def = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
        is_attr_assign = isinstance(node, ast.Assign) and all(isinstance(t, ast.Attribute) for t in node.targets)
        if not (is_def or is_attr_assign):
            continue
        if not keep_wand and _mentions_wand(node):
            continue
        keep.append(node)
    return ast.Module(body=keep, type_ignores=[])


def find_reference_script(reference_dir: str | os.PathLike[str]) -> Path:
    """``make_cifar_c.py`` inside a hendrycks/robustness checkout (or its create_c folder)."""
    base = Path(reference_dir).expanduser()
    for candidate in (base / "ImageNet-C" / "create_c" / REFERENCE_SCRIPT, base / REFERENCE_SCRIPT):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {REFERENCE_SCRIPT} under {base} (looked in ImageNet-C/create_c/ and the folder itself); "
        "pass --reference-dir pointing at a checkout of github.com/hendrycks/robustness"
    )


@dataclass
class Reference:
    """The reference's corruption functions by name, and what could not be loaded and why."""

    script: Path
    functions: dict[str, Callable[..., Any]]
    skipped: dict[str, str] = field(default_factory=dict)


def load_reference(reference_dir: str | os.PathLike[str]) -> Reference:
    """Execute the definitions of the user's ``make_cifar_c.py`` (never its driver) with our shims."""
    script = find_reference_script(reference_dir)
    has_wand, wand_error = _wand_available()
    _ensure_scipy_interpolation()
    module = _definitions_only(script.read_text(), str(script), keep_wand=has_wand)
    namespace: dict[str, Any] = {"__name__": "make_cifar_c_definitions", "__file__": str(script)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(module, str(script), "exec"), namespace)  # noqa: S102 - the user's checkout, by design
    _install_shims(namespace, script.parent)
    functions: dict[str, Callable[..., Any]] = {}
    skipped: dict[str, str] = {}
    for name in ALL_CORRUPTIONS:
        fn = namespace.get(name)
        if callable(fn):
            functions[name] = fn
        else:
            skipped[name] = f"{script.name} defines no function {name!r}"
    if not has_wand:
        for name in WAND_DEPENDENT:
            functions.pop(name, None)
            skipped[name] = f"Wand/ImageMagick unavailable ({wand_error}); install libmagickwand-dev and Wand"
    return Reference(script=script, functions=functions, skipped=skipped)


def _install_shims(namespace: dict[str, Any], folder: Path) -> None:
    """Rebind the reference's module-level names to our compatibility shims (its functions look
    them up at call time)."""
    if "np" in namespace:
        namespace["np"] = _numpy_shim()
    if "gaussian" in namespace:
        namespace["gaussian"] = _gaussian_shim(namespace["gaussian"])
    if "sk" in namespace:
        namespace["sk"] = _skimage_shim(namespace["sk"])
    if "cv2" in namespace:
        namespace["cv2"] = _cv2_shim(namespace["cv2"], folder)


def reference_corrupt(fn: Callable[..., Any], images: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """The reference driver's per-image loop on uint8 [N,32,32,3]: the image goes through
    ToTensor/ToPILImage as there, the result through ``np.uint8`` (truncation)."""
    import torchvision.transforms as trn

    convert = trn.Compose([trn.ToTensor(), trn.ToPILImage()])
    np.random.seed(seed % 2**32)
    out = np.empty_like(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(images.shape[0]):
            out[i] = np.uint8(fn(convert(images[i]), severity))
    return out


# ---------------------------------------------------------------- shared random draws


def _replay_elastic(images: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Ours on the very draws the reference makes after ``np.random.seed(seed)``: per image a
    U(-affine, affine) 3x2 anchor shift cast to float32, then two U(-1, 1) 32x32 fields (the
    order of its calls), fed to :func:`ltta.corruptions.digital.elastic_from_draws`. With the
    randomness shared, elastic becomes a pixel-for-pixel comparison."""
    from ltta.corruptions import severity as sev
    from ltta.corruptions import truncate_to_uint8
    from ltta.corruptions.digital import elastic_from_draws

    affine = sev.level(sev.ELASTIC, severity)[2]
    h, w = images.shape[1:3]
    rs = np.random.RandomState(seed % 2**32)
    shift, ux, uy = [], [], []
    for _ in range(images.shape[0]):
        shift.append(rs.uniform(-affine, affine, size=(3, 2)).astype(np.float32))
        ux.append(rs.uniform(-1, 1, size=(h, w)))
        uy.append(rs.uniform(-1, 1, size=(h, w)))
    t = [torch.from_numpy(np.stack(v)) for v in (shift, ux, uy)]
    y = elastic_from_draws(to_float_nchw(images, "cpu"), severity, *t)
    return truncate_to_uint8(y).cpu().numpy()


#: Random corruptions whose draws we can replay into ours: name -> fn(images, severity, seed).
SHARED_DRAWS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {"elastic_transform": _replay_elastic}
