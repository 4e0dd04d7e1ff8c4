"""SoDeep's learned sorter (Engilberge et al., "SoDeep: a Sorting Deep net to learn ranking loss
surrogates", CVPR 2019): a small recurrent network trained on synthetic score sequences to output
their ranks, used frozen as the differentiable ranking inside the predictor's loss.

Read off technicolor-research/sodeep (vendored unchanged by kakaobrain/learning-loss-for-tta under
``sodeep/``):

- **Which sorter.** learning-loss-for-tta ``conf.py`` loads ``weights/best_model_gruc.pth.tar``:
  the ``gruc`` model (``model.py`` ``gru_constrained``): ``sigmoid(x / 2 + 1)``, a 6-layer
  bidirectional GRU of width 32, the 64 outputs of each step summed, a sigmoid. It does not depend
  on the sequence length. SoDeep's own ``train.py`` defaults to ``lstmla`` (``lstm_large``: a
  2-layer biLSTM of width 512 then a ``Conv1d(L, L, 1024)`` across the positions), the model of
  the paper; ``lstm`` (``lstm_baseline``) is the same at width 128. All three are here.
- **Output scale** (``utils.py`` ``get_rank``, ``dataset.py`` ``SeqDataset``): the *normalised
  descending* rank, ``(position in descending order + 1) / L``: the largest score -> ``1/L``, the
  smallest -> 1.
- **Data** (``dataset.py`` ``get_rand_seq``): each sequence draws one of ten generators
  uniformly (``randint(0, 9)``; an 11th exists but is never drawn): U(-1, 1) (twice), N(0, 1),
  an evenly spaced ramp from ``a`` towards ``b`` (a, b ~ U(0, 1)) sorted or shuffled, a split
  point ``k ~ randint(1, L)`` with U(-1, 1) then N(0, 1) (twice, the two uniform forms being the
  same law), U(-1, 1) on both sides of the split, a shuffled ramp of ``k`` values then U(-1, 1),
  and the fixed ramp ``-1 + 2 i / L``. Drawn fresh for every sequence.
- **Training** (``train.py``): L1 loss between the sorter's output and the exact ranks, Adam
  (lr 1e-3, default betas), batch 256, ``StepLR(70 epochs, 0.5)`` stepped at the *start* of each
  epoch (so the first halving comes one epoch early, at epoch 70 counted from 1), 400 epochs of
  360,000 sequences (the 90% training share of ``SeqDataset``'s 400,000; the other 40,000 are the
  validation share, drawn afresh as well), and the checkpoint of the best validation L1 kept.
  Sequence length 100 by default there; here it is the number of candidates the predictor ranks.

Differences: the validation sequences are drawn once per training run (seeded) instead of anew
each epoch, so the best-epoch choice compares like with like; ties in the (measure-zero) random
draws get averaged ranks. The defaults of :class:`SorterConfig` are the paper's; the paper's
schedule is about 563,000 steps (hours on a GPU, days on a CPU): scale it down through
``sequences_per_epoch`` (steps per epoch) and ``epochs``.

The trained sorter is a small artifact that depends on its settings and seed only, never on
data: :func:`ensure_sorter` keeps it in a cache directory under a name made of those settings,
and trains it only when it is not there (``ltta train-sorter`` trains it ahead, e.g. on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ltta.checkpoint import private_rng, stable_hash
from ltta.io import load_torch, save_torch
from ltta.registry import Registry
from ltta.predictor.ranking import exact_rank, normalized_descending_rank, spearman_rho

#: Bump when the sorter code changes in a way that invalidates cached weights.
FORMAT_VERSION = 1


# ---------------------------------------------------------------- sorter networks


class GRUConstrainedSorter(nn.Module):
    """``gru_constrained`` (model.py, "gruc"): the sorter learning-loss-for-tta loads."""

    def __init__(self, seq_len: int) -> None:
        super().__init__()
        self.seq_len = seq_len  # informational: the network takes any length
        self.rnn = nn.GRU(1, 32, num_layers=6, batch_first=True, bidirectional=True)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(torch.sigmoid(scores.unsqueeze(-1) / 2.0 + 1.0))  # [B,L,64]
        return torch.sigmoid(h.sum(-1))


class LSTMConvSorter(nn.Module):
    """``lstm_baseline`` ("lstm", width 128) and ``lstm_large`` ("lstmla", width 512, the paper's):
    a 2-layer biLSTM, then one Conv1d whose channels are the L positions and whose kernel spans the
    2 x width features, so every output rank sees every position's features (fixed length L)."""

    def __init__(self, seq_len: int, hidden: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.lstm = nn.LSTM(1, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.conv = nn.Conv1d(seq_len, seq_len, kernel_size=2 * hidden)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] != self.seq_len:
            raise ValueError(
                f"this sorter ranks sequences of length {self.seq_len}, got {scores.shape[-1]}; "
                "train one for this length (sorter seq_len) or use the length-free 'gruc' sorter"
            )
        h, _ = self.lstm(scores.unsqueeze(-1))  # [B,L,2H]
        return self.conv(h).squeeze(-1)  # [B,L]


SORTERS: Registry[Callable[[int], nn.Module]] = Registry("SoDeep sorter")
SORTERS.add("gruc", GRUConstrainedSorter)
SORTERS.add("lstm", lambda seq_len: LSTMConvSorter(seq_len, 128))
SORTERS.add("lstm_large", lambda seq_len: LSTMConvSorter(seq_len, 512))


# ---------------------------------------------------------------- synthetic data


def _ramp(start: torch.Tensor, stop: torch.Tensor, count: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``np.arange(a, b, (b - a) / count)`` per row, padded to ``seq_len`` (values past ``count`` unused)."""
    i = torch.arange(seq_len, device=start.device, dtype=start.dtype)
    return start[:, None] + (stop - start)[:, None] * i[None] / count[:, None].to(start.dtype)


def _shuffle_prefix(x: torch.Tensor, count: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shuffle the first ``count[r]`` entries of each row, keep the rest in place."""
    n, length = x.shape
    pos = torch.arange(length, device=x.device)
    keys = torch.rand(n, length, device=x.device, generator=gen)  # < 1: the prefix sorts first
    keys = torch.where(pos[None] < count[:, None], keys, 1.0 + pos[None].to(keys.dtype))
    return x.gather(1, keys.argsort(1))


def random_sequences(n: int, seq_len: int, gen: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` sequences [n, seq_len] from SoDeep's ten generators (``dataset.py`` ``get_rand_seq``), batched."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to rank, got {seq_len}")
    dev = torch.device(device)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=dev, generator=gen)

    kind = torch.randint(0, 10, (n,), device=dev, generator=gen)
    uni = u(n, seq_len) * 2.0 - 1.0  # rand * 2 - 1 and uniform(-1, 1): the same law
    uni2 = u(n, seq_len) * 2.0 - 1.0
    normal = torch.randn(n, seq_len, device=dev, generator=gen)
    a, b = u(n), u(n)
    full = torch.full((n,), seq_len, device=dev)
    split = torch.randint(1, seq_len + 1, (n,), device=dev, generator=gen)  # randint(1, L), inclusive
    before = torch.arange(seq_len, device=dev)[None] < split[:, None]
    ramp = _ramp(a, b, full, seq_len)
    fixed = _ramp(torch.full((n,), -1.0, device=dev), torch.ones(n, device=dev), full, seq_len)
    part_ramp = _shuffle_prefix(_ramp(a, b, split, seq_len), split, gen)
    options = torch.stack(
        [
            uni,  # 0: rand * 2 - 1
            uni,  # 1: uniform(-1, 1)
            normal,  # 2: standard normal
            ramp,  # 3: arange(a, b, (b - a) / L)
            _shuffle_prefix(ramp, full, gen),  # 4: the same, shuffled
            torch.where(before, uni, normal),  # 5: uniform then normal, split at k
            torch.where(before, uni, normal),  # 6: the same law as 5
            torch.where(before, uni, uni2),  # 7: uniform on both sides of k
            torch.where(before, part_ramp, uni2),  # 8: shuffled ramp of k values, then uniform
            fixed,  # 9: arange(-1, 1, 2 / L)
        ]
    )  # [10, n, L]
    return options.gather(0, kind[None, :, None].expand(1, n, seq_len)).squeeze(0)


def sorter_targets(seqs: torch.Tensor) -> torch.Tensor:
    """The exact ranks on SoDeep's scale: largest -> 1/L, smallest -> 1 (``SeqDataset.__getitem__``)."""
    return normalized_descending_rank(exact_rank(seqs))


# ---------------------------------------------------------------- training


@dataclass
class SorterConfig:
    """The sorter and its training; defaults are SoDeep's ``train.py`` (with learning-loss-for-tta's model)."""

    model: str = "gruc"  # learning-loss-for-tta's conf.py; SoDeep train.py's default is "lstm_large"
    seq_len: int = 24  # sequences ranked: the predictor's candidate count (SoDeep's default: 100)
    epochs: int = 400  # -mepoch
    sequences_per_epoch: int = 360_000  # 90% of SeqDataset(nb_sample=400000): 1,407 steps of 256
    batch_size: int = 256  # -bs
    lr: float = 1e-3  # -lr, Adam
    lr_step_epochs: int = 70  # -lrs: StepLR(step_size=70, gamma=0.5)
    lr_gamma: float = 0.5
    valid_sequences: int = 40_000  # the 10% validation share
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in SORTERS:
            raise ValueError(f"SorterConfig: unknown sorter model {self.model!r}; known: {', '.join(SORTERS.names())}")
        checks = [
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.sequences_per_epoch >= 1, "sequences_per_epoch must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_step_epochs >= 1, "lr_step_epochs must be >= 1"),
            (0 < self.lr_gamma <= 1, "lr_gamma must lie in (0, 1]"),
            (self.valid_sequences >= 1, "valid_sequences must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SorterConfig: {msg}")

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one partial (DataLoader without drop_last)."""
        return math.ceil(self.sequences_per_epoch / self.batch_size)

    def key(self) -> str:
        """A file name that identifies these settings (and the code's format version)."""
        digest = stable_hash({"format": FORMAT_VERSION, **asdict(self)}, 10)
        return f"sodeep_{self.model}_L{self.seq_len}_seed{self.seed}_{digest}"


def build_sorter(model: str, seq_len: int) -> nn.Module:
    """A fresh (untrained) sorter network."""
    return SORTERS.get(model)(seq_len)


@torch.no_grad()
def sorter_quality(sorter: nn.Module, seqs: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """L1 to the exact ranks (the training loss), mean Spearman rho of output vs input, and the
    fraction of sequences whose largest entry the sorter ranks first."""
    l1 = rho = top1 = 0.0
    for start in range(0, seqs.shape[0], batch_size):
        s = seqs[start : start + batch_size]
        out = sorter(s)
        target = sorter_targets(s)
        l1 += float((out - target).abs().mean(1).sum())
        rho += float(spearman_rho(-out, s).nan_to_num(0.0).sum())  # low output = high rank
        top1 += float((out.argmin(1) == s.argmax(1)).float().sum())
    n = seqs.shape[0]
    return {"l1": l1 / n, "rho": rho / n, "top1": top1 / n}


def train_sorter(
    cfg: SorterConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a sorter as SoDeep's ``train.py`` does; return the best-validation-L1 model (eval mode) and the history."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    valid = random_sequences(cfg.valid_sequences, cfg.seq_len, torch.Generator(device=dev).manual_seed(cfg.seed + 1), dev)
    with private_rng(dev, cfg.seed):  # the networks' initial weights
        model = build_sorter(cfg.model, cfg.seq_len).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    criterion = nn.L1Loss()
    best: tuple[float, dict[str, torch.Tensor]] = (math.inf, {})
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"sorter {cfg.model} L={cfg.seq_len}", disable=not progress)
    for epoch in bar:
        t0 = time.time()
        # train.py calls lr_scheduler.step() before the epoch's training: StepLR at last_epoch = epoch.
        lr = cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum, done = 0.0, 0
        for step in range(cfg.steps_per_epoch):
            n = min(cfg.batch_size, cfg.sequences_per_epoch - step * cfg.batch_size)
            seqs = random_sequences(n, cfg.seq_len, gen, dev)
            loss = criterion(model(seqs), sorter_targets(seqs))
            if not bool(torch.isfinite(loss)):
                raise RuntimeError(f"sorter training diverged (loss {float(loss)}) at epoch {epoch}; lower sorter lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * n
            done += n
        model.eval()
        quality = sorter_quality(model, valid)
        metrics = {"epoch": float(epoch), "lr": lr, "train_l1": loss_sum / done, **{f"valid_{k}": v for k, v in quality.items()}}
        metrics["seconds"] = time.time() - t0
        history.append(metrics)
        if quality["l1"] < best[0]:  # save_checkpoint(is_best): the best validation loss is kept
            best = (quality["l1"], {k: v.detach().clone() for k, v in model.state_dict().items()})
        bar.set_postfix(l1=f"{quality['l1']:.4f}", rho=f"{quality['rho']:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    model.load_state_dict(best[1])
    return model.eval(), history


# ---------------------------------------------------------------- files and cache


def save_sorter(path: str | Path, sorter: nn.Module, cfg: SorterConfig, history: Sequence[dict[str, float]] = ()) -> None:
    """Write ``{format, config, state_dict, history}`` atomically."""
    state = {k: v.detach().cpu() for k, v in sorter.state_dict().items()}
    save_torch(path, {"format": FORMAT_VERSION, "config": asdict(cfg), "state_dict": state, "history": list(history)})


def load_sorter(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, SorterConfig, list[dict[str, float]]]:
    """Rebuild a saved sorter; returns (sorter in eval mode, its config, its training history)."""
    p = Path(path)
    blob = load_torch(p, what="sorter", missing_fix="train the sorter first (ltta train-sorter)", redo="train it again")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
        raise ValueError(f"{p} is not a sorter file of format {FORMAT_VERSION}; delete it and train it again.")
    known = {f.name for f in fields(SorterConfig)}
    cfg = SorterConfig(**{k: v for k, v in blob["config"].items() if k in known})
    sorter = build_sorter(cfg.model, cfg.seq_len)
    sorter.load_state_dict(blob["state_dict"])
    return sorter.to(device).eval(), cfg, list(blob.get("history", []))


def ensure_sorter(
    cache_dir: str | Path, cfg: SorterConfig, *, device: torch.device | str = "cpu", progress: bool = True
) -> tuple[nn.Module, Path]:
    """The sorter for ``cfg`` from ``cache_dir``, trained and saved there first if it is missing."""
    path = Path(cache_dir) / f"{cfg.key()}.pt"
    if not path.exists():
        sorter, history = train_sorter(cfg, device=device, progress=progress)
        save_sorter(path, sorter, cfg, history)
    sorter, _, _ = load_sorter(path, device)
    return sorter, path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ltta.predictor.sodeep``: train (or find) one sorter and print its validation quality."""
    defaults = SorterConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(SorterConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    ap.add_argument("--cache-dir", type=Path, default=Path("models/sorters"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cfg = SorterConfig(**{f.name: getattr(args, f.name) for f in fields(SorterConfig)})
    sorter, path = ensure_sorter(args.cache_dir, cfg, device=args.device)
    valid = random_sequences(10_000, cfg.seq_len, torch.Generator(device=args.device).manual_seed(10_000 + cfg.seed), args.device)
    print(json.dumps({"path": str(path), **sorter_quality(sorter, valid)}, indent=2))
    return 0


__all__ = [
    "SORTERS",
    "GRUConstrainedSorter",
    "LSTMConvSorter",
    "SorterConfig",
    "build_sorter",
    "ensure_sorter",
    "load_sorter",
    "random_sequences",
    "save_sorter",
    "sorter_quality",
    "sorter_targets",
    "train_sorter",
]

if __name__ == "__main__":
    raise SystemExit(main())
