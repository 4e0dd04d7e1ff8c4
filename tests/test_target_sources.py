"""Targets from where users keep them: a checkpoint file of a registered architecture, a torchvision
model with published weights (from torchvision's own cache under $TORCH_HOME), refused where its
classes or input size are not the data's; the train_target stage writing one as the usual target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from ltta.config import ParamsError, parse_params
from ltta.model_io import load_model_file
from ltta.models import build_model
from ltta.models.published import PublishedModel, from_checkpoint, from_torchvision, parse_source
from ltta.stages import evaluate, train_target
from ltta.stages.base import Paths
from tests.conftest import copy_workspace

KWARGS = {"num_classes": 10, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "width": 4}


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", **KWARGS).eval()


@pytest.mark.parametrize("source", ["timm:resnet18", "robustbench:cifar10/Linf/Standard", "train:x", "checkpoint:",
                                    "resnet50"])
def test_an_unknown_or_incomplete_source_is_refused_in_the_params(source: str) -> None:
    from tests.conftest import tiny_params

    with pytest.raises(ParamsError, match="train_target.source"):
        parse_params(tiny_params(train_target={"source": source}))
    with pytest.raises(ValueError, match="is not one of: train, checkpoint:<path>, torchvision:<model>"):
        parse_source(source)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_a_checkpoint_is_read_as_training_scripts_save_it(wrap: str, tmp_path: Path) -> None:
    model = _small_cnn()
    state = model.state_dict()
    blob = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(blob, path)
    resolved = from_checkpoint(path, "small_cnn", {**KWARGS, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(resolved.model(x), model(x))  # the checkpoint's own normalisation, not the data's
    assert resolved.provenance["normalisation"] == "the checkpoint's" and len(resolved.provenance["md5"]) == 32


def test_a_checkpoint_without_our_normalisation_takes_the_datas_and_a_foreign_one_is_named(tmp_path: Path) -> None:
    model = _small_cnn()
    path = tmp_path / "ckpt.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}, path)
    resolved = from_checkpoint(path, "small_cnn", KWARGS)  # KWARGS hold the "data's" statistics
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(resolved.model(x), model(x))
    assert resolved.provenance["normalisation"].startswith("the prepared data's")
    with pytest.raises(ValueError, match=r"is not a resnet18 checkpoint: \d+ weights missing"):
        from_checkpoint(path, "resnet18", {k: v for k, v in KWARGS.items() if k != "width"})
    with pytest.raises(ValueError, match="does not fit small_cnn with 5 classes"):
        from_checkpoint(path, "small_cnn", {**KWARGS, "num_classes": 5})
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a readable weights-only torch checkpoint"):
        from_checkpoint(tmp_path / "junk.pt", "small_cnn", KWARGS)
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        from_checkpoint(tmp_path / "nothing.pt", "small_cnn", KWARGS)


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, torch.Tensor]]:
    """torchvision's cache ($TORCH_HOME/hub/checkpoints) holding weights under mobilenet_v3_small's
    published file name, as a download would have left them (random, so that nothing leaves the machine)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch.manual_seed(1)
    state = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / weights.url.rsplit("/", 1)[-1])
    return cache, state


def test_a_torchvision_target_takes_the_pipelines_inputs_and_normalises_as_its_weights_say(torch_home) -> None:
    _, state = torch_home
    resolved = from_torchvision("mobilenet_v3_small:IMAGENET1K_V1", num_classes=1000, image_size=224)
    assert resolved.arch == "published" and resolved.kwargs["input_size"] == 224
    assert resolved.provenance["source"] == "torchvision:mobilenet_v3_small:IMAGENET1K_V1"
    reference = torchvision.models.mobilenet_v3_small(num_classes=1000).eval()
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 224, 224)
    preprocess = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()
    expected = reference(torchvision.transforms.functional.normalize(x, preprocess.mean, preprocess.std))
    torch.testing.assert_close(resolved.model(x), expected)
    # Kept as a model file, it rebuilds without torchvision downloading anything.
    rebuilt = PublishedModel(**resolved.kwargs)
    rebuilt.load_state_dict(resolved.model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), expected)


def test_a_torchvision_target_of_other_classes_or_size_is_refused_naming_both(torch_home) -> None:
    with pytest.raises(ValueError, match=r"classifies 1000 classes at 224 px .* but the prepared data has 10 classes at 32 px"):
        from_torchvision("mobilenet_v3_small", num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="torchvision has no model 'no_such_net'"):
        from_torchvision("no_such_net", num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="has no weights 'IMAGENET9K'"):
        from_torchvision("mobilenet_v3_small:IMAGENET9K", num_classes=1000, image_size=224)


def test_the_stage_writes_a_checkpoint_target_that_the_evaluation_runs_on(tiny_pipeline: tuple[Path, dict],
                                                                          tmp_path: Path, monkeypatch) -> None:
    root, raw = tiny_pipeline
    ws = copy_workspace(root, tmp_path / "ws")
    shutil.copy(ws / "models" / "target.pt", tmp_path / "published.pt")  # our own model file: state_dict under a key
    (ws / "models" / "target.pt").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    raw = {**raw, "train_target": {**raw["train_target"], "source": f"checkpoint:{tmp_path / 'published.pt'}"}}
    params = parse_params(raw)
    train_target.run(params, Paths(ws))
    model, extra = load_model_file(ws / "models" / "target.pt")
    original, _ = load_model_file(tmp_path / "published.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert extra["source"]["source"] == f"checkpoint:{tmp_path / 'published.pt'}" and extra["history"] == []
    before = json.loads((root / "metrics" / "target.json").read_text())
    assert json.loads((ws / "metrics" / "target.json").read_text()) == before  # same weights, same test error
    evaluate.run(params, Paths(ws))
    record = json.loads((ws / "reports" / "eval.json").read_text())["protocol"]
    assert record["target"]["origin"] == extra["source"]["source"]
    assert f"checkpoint:{tmp_path / 'published.pt'}" in (ws / "reports" / "results.md").read_text()
