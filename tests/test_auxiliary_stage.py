"""Mode ``auxiliary`` through params.yaml and the train_target stage: the schema carries the trainer's
defaults, and the stage writes the plain architecture (auxiliary heads dropped)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ltta.config import TrainTargetParams, parse_params
from ltta.io import save_npz, write_json
from ltta.model_io import load_model_file
from ltta.models import build_model
from ltta.runtime import to_uint8_nhwc
from ltta.stages import train_target
from ltta.stages.base import Paths
from ltta.training import TrainConfig
from tests.conftest import tiny_params


def test_params_schema_carries_the_trainers_defaults() -> None:
    p, cfg = TrainTargetParams(mode="auxiliary"), TrainConfig(epochs=1)
    assert tuple(p.aux_families) == cfg.aux_families
    for key in ("aux_ce_weight", "aux_distill_weight", "aux_temperature", "aux_merge_weight", "aux_merge_start"):
        assert getattr(p, key) == getattr(cfg, key), key
    assert TrainConfig(epochs=1, aux_families=["noise"]).aux_families == ("noise",)  # lists from YAML
    with pytest.raises(ValueError, match="cutout must be 0"):
        TrainTargetParams(mode="auxiliary", cutout=16)


def test_train_target_stage_in_auxiliary_mode_writes_a_plain_target(
    digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the stage: params -> TrainConfig, training, then models/target.pt and the MLflow model
    (torch.export) are the plain architecture, loadable by every later stage."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = Paths(tmp_path)
    # prepare_data's outputs, written directly from the real digits (that stage has its own tests).
    save_npz(paths.prepared / "train.npz", x=to_uint8_nhwc(digits[0][:64]), y=digits[1][:64].numpy())
    save_npz(paths.prepared / "test.npz", x=to_uint8_nhwc(digits[2][:32]), y=digits[3][:32].numpy())
    write_json(paths.prepared / "meta.json", {"source": "digits", "classes": [str(i) for i in range(10)],
                                              "num_classes": 10, "image_size": 32, "n_test": 32,
                                              "mean": [0.3, 0.3, 0.3], "std": [0.3, 0.3, 0.3]})  # fmt: skip
    raw = tiny_params(train_target={"mode": "auxiliary", "epochs": 1, "batch_size": 32, "width": 4,
                                    "aux_families": ["noise", "rotate"]})  # fmt: skip
    raw["tracking"].update(register_models=False)
    train_target.run(parse_params(raw), paths)
    model, extra = load_model_file(paths.target)
    assert type(model).__name__ == "SmallCNN" and len(extra["history"]) == 1
    assert list(model.state_dict()) == list(build_model("small_cnn", num_classes=10, width=4).state_dict())
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert not list(paths.checkpoints.glob("target-*.pt"))  # finished: the checkpoint (with its heads) is gone
