"""ltta as a library: README's snippets run as written; the wrapper is the pipeline's method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ltta.api
from ltta.evaluation import CLEAN, EvalSet, evaluate_methods
from ltta.models.small_cnn import SmallCNN
from ltta.tta import build_method
from ltta.tta.merging import MERGES, merge

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## ltta as a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_api_snippets_run_as_written(tiny_pipeline: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """The three snippets, in order, in the pipeline's workspace (the files the second one reads).
    The workspace's store has no champion (`ltta promote` has not run there), so the MLflow line is
    run on the version the evaluate stage registered; it answers as the files do."""
    blocks = readme_python_blocks()
    assert len(blocks) == 3
    ws = tiny_pipeline[0]
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    scope: dict = {}
    exec(blocks[0], scope)  # noqa: S102 (the README's own code)
    assert scope["probs"].shape == (4, 10)
    torch.testing.assert_close(scope["probs"].sum(1), torch.ones(4))
    second = [line for line in blocks[1].splitlines() if "from_mlflow" not in line]
    exec("\n".join(second), scope)  # noqa: S102
    assert isinstance(scope["learned"], torch.nn.Module) and scope["gps"].method_name == "gps"
    mlflow_line = next(line for line in blocks[1].splitlines() if "from_mlflow" in line)
    assert 'from_mlflow("models:/ltta-tta@champion")' in mlflow_line
    served = ltta.api.TTA.from_mlflow("models:/ltta-tta/1")
    x = torch.rand(5, 3, served.method.ctx.image_size, served.method.ctx.image_size)
    assert served.method_name == "learned" and served(x).shape[0] == 5
    exec(blocks[2], scope)  # noqa: S102
    summary = scope["results"].summary()
    assert list(summary) == ["none", "flip"] and summary["none"]["forward_passes"] == 1.0


def _model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(num_classes=5, width=4).eval()


@pytest.mark.parametrize("method", ["none", "flip", "five_crop", "ten_crop", "random"])
def test_the_wrapper_is_the_pipelines_method(method: str) -> None:
    """Same images, same method: the module's probabilities are the evaluate runner's, bit for bit."""
    model = _model()
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(12) % 5
    probs = ltta.api.TTA(model, method, k=3)(x)
    ref = build_method(method, model, k=3).predict(x)
    assert torch.equal(probs, ref)
    rec = evaluate_methods({method: build_method(method, model, k=3)}, [EvalSet(CLEAN, 0, x, y)], progress=False).records[0]
    assert rec.error == pytest.approx(100.0 * float((probs.argmax(1) != y).float().mean()))


def test_merge_modes_return_probabilities_and_mean_is_the_default() -> None:
    per_view = torch.softmax(torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    for mode in MERGES.names():
        out = merge(per_view, mode)
        torch.testing.assert_close(out.sum(1), torch.ones(6))
    torch.testing.assert_close(merge(per_view, "mean"), per_view.mean(0))
    torch.testing.assert_close(merge(per_view, "max"), per_view.amax(0) / per_view.amax(0).sum(1, keepdim=True))
    gm = per_view.log().mean(0).exp()
    torch.testing.assert_close(merge(per_view, "gmean"), gm / gm.sum(1, keepdim=True))
    model, x = _model(), torch.rand(6, 3, 32, 32)
    assert torch.equal(ltta.api.TTA(model, "flip")(x), ltta.api.TTA(model, "flip", merge="mean")(x))
    assert not torch.equal(ltta.api.TTA(model, "five_crop", merge="max")(x), ltta.api.TTA(model, "five_crop")(x))


def test_the_wrapper_refuses_what_it_cannot_do() -> None:
    model = _model()
    with pytest.raises(KeyError, match="unknown merge mode 'median'"):
        ltta.api.TTA(model, "flip", merge="median")
    with pytest.raises(ValueError, match="does not average views with equal weight"):
        ltta.api.TTA(model, "tent", merge="gmean")
    with pytest.raises(ValueError, match=r"needs its fitted predictor: load it with TTA\.from_files"):
        ltta.api.TTA(model, "learned")
    with pytest.raises(ValueError, match=r"expected images \[N,3,H,W\]"):
        ltta.api.TTA(model, "flip")(torch.rand(2, 32, 32))


def test_benchmark_reproduces_the_evaluate_stages_table(tiny_pipeline: tuple[Path, dict]) -> None:
    """On the tiny pipeline's own files (target, test split, corrupted sets), benchmark() gives the
    evaluate stage's numbers for the methods that need no fitting, adaptation included."""
    import json

    import numpy as np

    from ltta.model_io import load_model_file

    ws, raw = tiny_pipeline
    e = raw["evaluate"]
    assert e["max_images"] >= raw["data"]["max_test"]  # the stage evaluated the whole test split, as below
    target, _ = load_model_file(ws / "models" / "target.pt")
    with np.load(ws / "data" / "prepared" / "test.npz") as z:
        x, y = z["x"], z["y"]
    methods = ["none", "flip", "five_crop", "ten_crop", "random", "bn_adapt", "tent"]
    results = ltta.api.benchmark(target, x, y, methods=methods, corruptions=raw["corruptions"]["names"],
                                 severities=e["severities"], corrupted_dir=ws / "data" / "corrupted" / "test",
                                 k=e["k"], batch_size=e["batch_size"], bn_prior=e["bn_prior"])
    ours = results.summary(baseline_method="none")
    theirs = json.loads((ws / "reports" / "eval.json").read_text())["summary"]
    for m in methods:
        for key in ("clean_error", "mean_corruption_error", "extra_error", "corruption_nll", "forward_passes"):
            assert ours[m][key] == pytest.approx(theirs[m][key], abs=1e-4), (m, key)
