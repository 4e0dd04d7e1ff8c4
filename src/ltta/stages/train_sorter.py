"""``ltta train-sorter``: train SoDeep's sorter ahead of ``train_predictor`` (ranker ``sodeep``).

Not a DVC stage: the sorter depends on its settings (``train_predictor.sorter``), the candidate
count (its sequence length) and the seed only, never on data, so it is kept in a cache directory
(``models/sorters/``) under a name made of those settings (:meth:`ltta.predictor.sodeep.SorterConfig.key`).
``train_predictor`` trains it there itself when it is missing; this command does it ahead, e.g. on
a GPU machine for the paper's full schedule, whose file then serves every later run. Prints the
sorter's quality on fresh synthetic sequences.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ltta.config import Params
from ltta.runtime import resolve_device
from ltta.stages.base import Paths
from ltta.tta import build_candidates
from ltta.predictor.sodeep import SorterConfig, ensure_sorter, random_sequences, sorter_quality

STAGE = "train_sorter"


def sorter_cache(paths: Paths) -> Path:
    """Where trained sorters are kept (beside the models, outside DVC's outputs)."""
    return paths.root / "models" / "sorters"


def sorter_config(params: Params, seq_len: int) -> SorterConfig:
    """The sorter ``train_predictor`` uses: ``train_predictor.sorter`` at the candidate count and global seed."""
    sp = params.train_predictor.sorter
    return SorterConfig(
        model=sp.model, seq_len=seq_len, epochs=sp.epochs, sequences_per_epoch=sp.sequences_per_epoch,
        batch_size=sp.batch_size, lr=sp.lr, lr_step_epochs=sp.lr_step_epochs, valid_sequences=sp.valid_sequences,
        seed=params.seed,
    )


def load_or_train_sorter(params: Params, seq_len: int, paths: Paths, device: torch.device) -> tuple[nn.Module, Path]:
    """The cached sorter for these params, trained first if it is not there yet."""
    return ensure_sorter(sorter_cache(paths), sorter_config(params, seq_len), device=device)


def run(params: Params, paths: Paths = Paths()) -> None:
    device = resolve_device(params.device)
    seq_len = len(build_candidates(params.loss_dataset.candidates))
    sorter, path = load_or_train_sorter(params, seq_len, paths, device)
    gen = torch.Generator(device=device).manual_seed(10_000 + params.seed)  # not the training or validation draws
    quality = sorter_quality(sorter, random_sequences(2_000, seq_len, gen, device))
    print(f"sorter {path} (L = {seq_len}): L1 {quality['l1']:.4f}, Spearman rho {quality['rho']:.4f}, "
          f"top-1 {quality['top1']:.4f} on fresh synthetic sequences")
