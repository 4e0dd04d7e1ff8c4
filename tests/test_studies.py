"""The paper's studies as Hydra config groups (conf/study/, conf/unseen/): each composes with every
profile into valid params that set what the study is about, DVC composes them the same way, the
held-out corruptions never reach a training list, and the trainer and the report do their part."""

from __future__ import annotations

import functools
import typing
from pathlib import Path

import pytest
import torch
import yaml

from ltta.compose import compose_params
from ltta.config import Params, ParamsError, TrainTargetParams, load_params, parse_params
from ltta.corruptions import ALL_CORRUPTIONS, BENCHMARK, EXTRA, FAMILIES, random_corruptions
from ltta.evaluation import EvalResults, results_markdown
from ltta.training import TrainConfig
from ltta.training.corruption_mixing import corruption_augment as _corruption_augment
from ltta.training.preparation import batch_preparation as _batch_preparation

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STUDIES = sorted(p.stem for p in (CONF / "study").glob("*.yaml"))
UNSEEN = sorted(p.stem for p in (CONF / "unseen").glob("*.yaml"))
PROFILES = sorted(p.stem for p in (CONF / "profile").glob("*.yaml"))
MODES = typing.get_args(TrainTargetParams.model_fields["mode"].annotation)


@functools.cache
def _raw(*overrides: str) -> dict:
    """The composition before validation (to inspect a study whose mode the schema lacks yet)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)


def _compose_raw(overrides: list[str]) -> dict:
    return yaml.safe_load(yaml.safe_dump(_raw(*overrides)))  # a private copy of the cached mapping


def _params(*overrides: str) -> Params:
    """compose_params (Hydra, then the schema), with the composition cached across tests."""
    return parse_params(_compose_raw(list(overrides)))


def test_the_groups_hold_the_papers_studies() -> None:
    assert set(STUDIES) == {"standard", "augmix", "policy", "auxiliary", "augmix_plus", "blur_train"}
    assert set(UNSEEN) == {"none"} | (set(FAMILIES) - {"extra"})


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("study", STUDIES)
def test_every_study_composes_with_every_profile(profile: str, study: str) -> None:
    raw = _compose_raw([f"profile={profile}", f"study={study}"])
    assert (raw["profile"], raw["study"], raw["unseen"]) == (profile, study, "none")
    if raw["train_target"]["mode"] not in MODES:
        pytest.skip(f"the schema has no train_target.mode {raw['train_target']['mode']!r} yet")
    params = parse_params(raw)
    # The profile keeps the scale; the study never touches data or architecture.
    base = _params(f"profile={profile}")
    assert (params.data, params.train_target.arch, params.train_target.epochs) == (
        base.data, base.train_target.arch, base.train_target.epochs
    )
    assert params.corruptions.names == list(ALL_CORRUPTIONS)  # evaluation always on all 19


def test_target_studies_set_their_training() -> None:
    def tt(study: str) -> dict:
        return _compose_raw([f"study={study}"])["train_target"]

    assert (tt("standard")["mode"], tt("standard")["corruptions"]) == ("standard", [])
    augmix = tt("augmix")
    assert (augmix["mode"], augmix["cutout"], augmix["min_lr"], augmix["corruptions"]) == ("augmix", 0, 1e-6, [])
    policy = tt("policy")
    assert (policy["mode"], policy["policy"], policy["cutout"]) == ("policy", "policies/faa.json", 16)
    assert tt("auxiliary")["mode"] == "auxiliary"
    # AugMix+: the AugMix recipe plus exactly the predictor's corruptions, as often as the predictor sees them.
    plus = _params("study=augmix_plus")
    assert (plus.train_target.mode, plus.train_target.min_lr) == ("augmix", 1e-6)
    assert plus.train_target.corruptions == plus.loss_dataset.corruptions == list(BENCHMARK)
    assert plus.train_target.corruption_p == plus.loss_dataset.p_aug
    blur = _params("study=blur_train")
    assert (blur.train_target.mode, blur.train_target.corruptions) == ("standard", list(FAMILIES["blur"]))
    assert "gaussian_blur" not in blur.train_target.corruptions  # an extra: held out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "extra"])
def test_unseen_split_holds_one_family_out_of_training(family: str) -> None:
    params = _params(f"unseen={family}")
    assert params.unseen == family
    assert params.loss_dataset.corruptions == [c for c in BENCHMARK if c not in FAMILIES[family]]
    assert params.corruptions.names == list(ALL_CORRUPTIONS)
    # An AugMix+ target follows the predictor's list, so the family stays out of its training too.
    plus = _params("profile=cifar10", "study=augmix_plus", f"unseen={family}")
    assert not set(plus.train_target.corruptions) & set(FAMILIES[family])
    assert plus.train_target.corruptions == params.loss_dataset.corruptions


def test_defaults_are_the_committed_params() -> None:
    committed = load_params(ROOT / "params.yaml")
    assert committed == compose_params(CONF, ["study=standard", "unseen=none"]) == compose_params(CONF, [])
    assert (committed.study, committed.unseen, committed.train_target.corruptions) == ("standard", "none", [])


def test_held_out_corruptions_never_reach_training() -> None:
    with pytest.raises(ValueError, match="train_target.corruptions") as err:
        compose_params(CONF, ["study=blur_train", "unseen=blur"])
    assert "unseen family 'blur'" in str(err.value)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("loss_dataset", "train_target"):
        bad = yaml.safe_load(yaml.safe_dump(raw))
        bad[key]["corruptions"] = ["gaussian_noise", EXTRA[0]]
        with pytest.raises(ParamsError, match=f"{key}.corruptions contains \\['{EXTRA[0]}'\\]"):
            parse_params(bad)
    bad = yaml.safe_load(yaml.safe_dump(raw))
    bad["unseen"] = "noise"  # the list still holds the noise family
    with pytest.raises(ParamsError, match="loss_dataset.corruptions contains"):
        parse_params(bad)


def test_dvc_composes_a_study_as_we_do(tmp_path: Path) -> None:
    """`dvc exp run -S study=... -S unseen=...` goes through DVC's Hydra helper: the same params."""
    from dvc.utils.hydra import compose_and_dump

    overrides = ["profile=cifar10", "study=augmix_plus", "unseen=noise"]
    out = tmp_path / "params.yaml"
    compose_and_dump(str(out), str(CONF), None, "config", str(ROOT), overrides)
    assert load_params(out) == compose_params(CONF, overrides)


# ---------------------------------------------------------------- the trainer's corruptions


def _images(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g).mul(255).round().div(255)


def test_training_corruptions_are_the_predictors_draws() -> None:
    x = _images()
    names = ("gaussian_noise", "defocus_blur")
    prepare = _batch_preparation(None, lambda xb, g: xb, 0, 0.0, corrupt=_corruption_augment(names, 1.0))
    got = prepare(x, torch.Generator().manual_seed(3))
    want = random_corruptions(x, torch.Generator().manual_seed(3), 1.0, names)
    assert torch.equal(got, want)
    assert bool(((got - x).abs().flatten(1).amax(1) > 0).all())  # p = 1: every image corrupted
    assert _corruption_augment(names, 0.0) is None and _corruption_augment((), 1.0) is None
    many = _images(400)
    half = random_corruptions(many, torch.Generator().manual_seed(1), 0.4, ("gaussian_noise",))
    changed = (half - many).abs().flatten(1).amax(1) > 0
    assert 0.3 < float(changed.float().mean()) < 0.5  # about p of the images
    with pytest.raises(ValueError, match="TrainConfig.corruptions"):
        TrainConfig(epochs=1, corruptions=("rain",))
    with pytest.raises(ValueError, match="corruption_p"):
        TrainConfig(epochs=1, corruptions=names, corruption_p=1.5)


def test_trainer_corrupts_before_the_policy_and_pins_the_list(tmp_path: Path) -> None:
    from ltta.models import build_model
    from ltta.training import CheckpointMismatchError, train_classifier

    x, y = _images(64), torch.arange(64) % 10
    seen: list[torch.Tensor] = []

    def record(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(xb.clone())
        return xb

    cfg = TrainConfig(epochs=1, batch_size=32, corruptions=("gaussian_noise",), corruption_p=1.0)
    ckpt = tmp_path / "ckpt.pt"
    train_classifier(build_model("small_cnn", width=4), x, y, cfg, extra_augment=record, checkpoint_path=ckpt,
                     progress=False)
    batch = torch.cat(seen)
    assert batch.shape == x.shape and torch.equal(batch, batch.mul(255).round().div(255))  # 8-bit levels
    nearest = torch.cdist(batch.flatten(1), x.flatten(1)).min(1).values
    assert bool((nearest > 0).all())  # no image reached the policy uncorrupted
    other = TrainConfig(epochs=2, batch_size=32, corruptions=("shot_noise",), corruption_p=1.0)
    with pytest.raises(CheckpointMismatchError, match="corruptions"):
        train_classifier(build_model("small_cnn", width=4), x, y, other, extra_augment=record,
                         checkpoint_path=ckpt, progress=False)


# ---------------------------------------------------------------- the report's seen / unseen split


def _results() -> EvalResults:
    rows = [dict(method="none", corruption="clean", severity=0, error=10.0)]
    errors = {"gaussian_noise": 40.0, "shot_noise": 30.0, "fog": 20.0, "contrast": 10.0}
    rows += [dict(method="none", corruption=c, severity=s, error=e + s) for c, e in errors.items() for s in (1, 2)]
    return EvalResults.from_records(
        [r | dict(nll=1.0, ece=5.0, n=10, images_per_s=100.0, forward_passes=1.0) for r in rows]
    )


def test_report_adds_seen_and_unseen_means() -> None:
    results = _results()
    plain = results.summary()["none"]
    assert "unseen_error" not in plain and plain["mean_corruption_error"] == pytest.approx(26.5)
    row = results.summary(unseen=["gaussian_noise", "shot_noise"])["none"]
    assert row["unseen_error"] == pytest.approx(36.5) and row["seen_error"] == pytest.approx(16.5)
    assert row["mean_corruption_error"] == plain["mean_corruption_error"]
    md = results_markdown(results, title="t", meta={}, unseen=["gaussian_noise", "shot_noise"])
    header = next(line for line in md.splitlines() if line.startswith("| Method | Clean"))
    assert "Seen err. (2)" in header and "Unseen err. (2)" in header
    assert "| none | 10.00 | 26.50 | 16.50 | 36.50 |" in md
    assert "Unseen err." not in results_markdown(results, title="t", meta={})
    with pytest.raises(ValueError, match="not among the benchmark"):
        results.summary(unseen=["speckle_noise"])


def test_evaluate_calls_unseen_what_no_training_saw() -> None:
    from ltta.stages.evaluate import unseen_corruptions

    evaluated = list(ALL_CORRUPTIONS)
    assert unseen_corruptions(_params(), evaluated) == []  # the default: all 15 in the predictor's inputs
    assert unseen_corruptions(_params("unseen=noise"), evaluated) == list(FAMILIES["noise"])
    # A target that trained on the held-out family has seen it: not unseen.
    raw = _compose_raw(["unseen=noise"])
    raw["unseen"], raw["train_target"]["corruptions"] = "none", ["shot_noise"]
    assert unseen_corruptions(parse_params(raw), evaluated) == ["gaussian_noise", "impulse_noise"]
    assert unseen_corruptions(_params("unseen=noise"), ["shot_noise", "fog"]) == ["shot_noise"]  # evaluated only
