"""Device selection and seeding: one place, so every stage is reproducible the same way."""

from __future__ import annotations

import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; set device: auto or cpu.")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous), so a wall clock measures it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same, for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` (random draws made on the device stay on the device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def to_float_nchw(images_uint8_nhwc: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N,H,W,C] (the on-disk layout) -> float32 [N,C,H,W] in [0,1] on ``device``."""
    t = torch.as_tensor(images_uint8_nhwc).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """float [N,C,H,W] in [0,1] -> uint8 [N,H,W,C] numpy, rounding to the nearest level."""
    return images.clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
