"""SoDeep's sorter: synthetic data, training as SoDeep's train.py, files and cache, use as a ranker."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ltta.config import load_params
from ltta.stages import train_sorter as sorter_stage
from ltta.stages.base import Paths
from ltta.models.loss_predictor import LossPredictor
from ltta.predictor.trainer import PredictorConfig, train_predictor
from ltta.tta import build_candidates
from ltta.predictor.ranking import build_ranker, exact_rank, spearman_rho
from ltta.predictor.sodeep import (
    SorterConfig,
    build_sorter,
    ensure_sorter,
    load_sorter,
    random_sequences,
    save_sorter,
    sorter_quality,
    sorter_targets,
    train_sorter,
)

L = 6


def tiny(**kw: object) -> SorterConfig:
    """100 Adam steps of 64 sequences: seconds on CPU."""
    base = dict(model="lstm", seq_len=L, epochs=10, sequences_per_epoch=640, batch_size=64, valid_sequences=256,
                lr_step_epochs=70)
    base.update(kw)
    return SorterConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[dict[str, float]]]:
    return train_sorter(tiny(), progress=False)


def iid_uniform(n: int, seed: int) -> torch.Tensor:
    """Sequences with no positional structure, so an untrained network cannot rank them by chance."""
    return torch.rand(n, L, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0


# ---------------------------------------------------------------- data


def test_targets_are_sodeeps_normalised_descending_ranks() -> None:
    # dataset.py SeqDataset: (position in descending order + 1) / L; the largest gets 1/L.
    seqs = torch.tensor([[0.3, -1.0, 2.0], [5.0, 4.0, 3.0]])
    torch.testing.assert_close(sorter_targets(seqs), torch.tensor([[2 / 3, 1.0, 1 / 3], [1 / 3, 2 / 3, 1.0]]))


def test_random_sequences_draw_sodeeps_generators() -> None:
    gen = torch.Generator().manual_seed(0)
    seqs = random_sequences(4000, 12, gen)
    assert seqs.shape == (4000, 12) and bool(torch.isfinite(seqs).all())
    assert torch.equal(seqs, random_sequences(4000, 12, torch.Generator().manual_seed(0)))
    fixed = -1.0 + 2.0 * torch.arange(12) / 12  # generator 9: arange(-1, 1, 2 / L)
    share_fixed = float(torch.isclose(seqs, fixed).all(1).float().mean())
    assert share_fixed == pytest.approx(0.1, abs=0.03)  # one of ten, drawn uniformly
    d = seqs.diff(dim=1)
    monotone = ((d > 0).all(1) | (d < 0).all(1)).float().mean()  # generators 3 and 9 (+ chance)
    assert float(monotone) == pytest.approx(0.2, abs=0.04)
    beyond = (seqs.abs() > 1).any(1).float().mean()  # only the normal parts leave [-1, 1] (generators 2, 5, 6)
    assert 0.15 < float(beyond) < 0.3


# ---------------------------------------------------------------- training


def test_a_briefly_trained_sorter_ranks_where_an_untrained_one_cannot(
    trained: tuple[torch.nn.Module, list[dict[str, float]]],
) -> None:
    sorter, history = trained
    seqs = iid_uniform(2000, 1)
    torch.manual_seed(0)
    before = sorter_quality(build_sorter("lstm", L), seqs)
    after = sorter_quality(sorter, seqs)
    assert abs(before["rho"]) < 0.2 and before["top1"] < 0.3
    assert after["rho"] > 0.8 and after["top1"] > 0.5 and after["l1"] < 0.5 * before["l1"]
    # As a ranker on 1..C it agrees with the exact ranks.
    ranks = build_ranker("sodeep", 1.0, sorter)(seqs)  # (the temperature is unused)
    assert float(spearman_rho(ranks, seqs).mean()) > 0.8
    assert float((ranks.round() == exact_rank(seqs)).float().mean()) > 0.4
    # The kept model is the best validation epoch, and training lowered the loss.
    assert history[-1]["train_l1"] < history[0]["train_l1"]
    assert min(h["valid_l1"] for h in history) == pytest.approx(sorter_quality(sorter, _valid(tiny()))["l1"], rel=1e-5)


@pytest.mark.slow
def test_the_public_codes_gruc_sorter_learns_to_rank() -> None:
    """gruc (what learning-loss-for-tta loads) learns slower than lstm: 400 steps, ~30 s on CPU."""
    seqs = iid_uniform(2000, 4)
    torch.manual_seed(0)
    assert abs(sorter_quality(build_sorter("gruc", L), seqs)["rho"]) < 0.2
    sorter, _ = train_sorter(tiny(model="gruc", epochs=20, sequences_per_epoch=1280), progress=False)
    assert sorter_quality(sorter, seqs)["rho"] > 0.8


def _valid(cfg: SorterConfig) -> torch.Tensor:
    return random_sequences(cfg.valid_sequences, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 1))


def test_learning_rate_follows_sodeeps_step_schedule() -> None:
    # train.py steps StepLR(70, 0.5) before each epoch: the first halving is at epoch 70 counted from 1.
    _, history = train_sorter(tiny(model="gruc", epochs=5, sequences_per_epoch=8, batch_size=8, valid_sequences=8,
                                   lr_step_epochs=2), progress=False)
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert SorterConfig().steps_per_epoch == 1407  # 360,000 / 256, the last batch partial
    with pytest.raises(ValueError, match="unknown sorter model"):
        SorterConfig(model="transformer")


def test_fixed_length_sorters_refuse_other_lengths() -> None:
    with pytest.raises(ValueError, match="length 6"):
        build_sorter("lstm", 6)(torch.rand(2, 7))
    assert build_sorter("gruc", 6)(torch.rand(2, 7)).shape == (2, 7)  # gruc takes any length
    assert build_sorter("lstm_large", 4)(torch.rand(2, 4)).shape == (2, 4)


# ---------------------------------------------------------------- files and cache


def test_save_load_round_trip(trained: tuple[torch.nn.Module, list[dict[str, float]]], tmp_path: Path) -> None:
    sorter, history = trained
    path = tmp_path / "s.pt"
    save_sorter(path, sorter, tiny(), history)
    loaded, cfg, hist = load_sorter(path)
    assert cfg == tiny() and hist == history and not loaded.training
    seqs = iid_uniform(16, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(seqs), sorter(seqs))
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # atomic write: no temporary left
    with pytest.raises(FileNotFoundError, match="train-sorter"):
        load_sorter(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="train it again"):
        load_sorter(tmp_path / "bad.pt")


def test_ensure_sorter_trains_once_per_setting(tmp_path: Path) -> None:
    cfg = tiny(model="gruc", epochs=1, sequences_per_epoch=8, batch_size=8, valid_sequences=8)
    first, path = ensure_sorter(tmp_path, cfg, progress=False)
    stamp = os.stat(path).st_mtime_ns
    again, same = ensure_sorter(tmp_path, cfg, progress=False)
    assert same == path and os.stat(path).st_mtime_ns == stamp  # found, not retrained
    seqs = iid_uniform(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(first(seqs), again(seqs))
    _, other = ensure_sorter(tmp_path, tiny(model="gruc", epochs=1, sequences_per_epoch=8, batch_size=8,
                                            valid_sequences=8, seed=1), progress=False)
    assert other != path and path.name.startswith("sodeep_gruc_L6_seed0_")


def test_train_sorter_command_uses_the_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    tp = params.train_predictor
    small = tp.sorter.model_copy(update={"epochs": 1, "sequences_per_epoch": 8, "batch_size": 8, "valid_sequences": 8})
    params = params.model_copy(update={"device": "cpu", "train_predictor": tp.model_copy(update={"sorter": small})})
    sorter_stage.run(params, Paths(tmp_path))
    files = list((tmp_path / "models" / "sorters").iterdir())
    seq_len = len(build_candidates(params.loss_dataset.candidates))
    assert len(files) == 1 and f"_L{seq_len}_" in files[0].name
    assert "Spearman rho" in capsys.readouterr().out
    _, cfg, _ = load_sorter(files[0])
    assert cfg == sorter_stage.sorter_config(params, seq_len) and cfg.seed == params.seed


# ---------------------------------------------------------------- in the predictor's objective


def test_predictor_trains_through_a_frozen_sorter(trained: tuple[torch.nn.Module, list[dict[str, float]]]) -> None:
    sorter, _ = trained
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    losses = torch.rand(64, L, generator=g)
    before = {k: v.clone() for k, v in sorter.state_dict().items()}
    cfg = PredictorConfig(epochs=1, batch_size=32, cutout=0.0, ranker="sodeep")
    with pytest.raises(ValueError, match="needs a trained sorter"):
        train_predictor(LossPredictor(L, width=2), x, losses, x, losses, cfg, device="cpu", progress=False)
    torch.manual_seed(0)
    model = LossPredictor(L, width=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _, history = train_predictor(model, x, losses, x, losses, cfg, device="cpu", sorter=sorter, progress=False)
    assert np.isfinite(history[0]["train_loss"]) and history[0]["train_loss"] > 0
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())  # the predictor learned
    assert all(torch.equal(before[k], v) for k, v in sorter.state_dict().items())  # the sorter did not
