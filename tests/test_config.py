"""params.yaml: one schema, every error names the key; the committed file equals conf/'s composition."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ltta.cli import main
from ltta.compose import compose_params
from ltta.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_are_valid_and_match_conf() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params == compose_params(ROOT / "conf", [])
    assert params.profile == "digits" and params.data.source == "digits"


@pytest.mark.parametrize("profile, source, arch", [("cifar10", "cifar10", "wrn_40_2"), ("cifar100", "cifar100", "wrn_40_2")])
def test_profiles_are_one_switch_away(profile: str, source: str, arch: str) -> None:
    params = compose_params(ROOT / "conf", [f"profile={profile}"])
    assert (params.profile, params.data.source, params.train_target.arch) == (profile, source, arch)
    assert params.train_target.epochs == 200


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r["train_target"].__setitem__("epochs", -1), "train_target.epochs"),
        (lambda r: r["train_target"].__setitem__("epochz", 3), "train_target.epochz"),
        (lambda r: r.__setitem__("extra_section", {}), "extra_section"),
        (lambda r: r["train_target"].__setitem__("lr", "fast"), "train_target.lr"),
        (lambda r: r["data"].__setitem__("source", "imagenet"), "data.source"),
        (lambda r: r["corruptions"].__setitem__("names", ["gaussian_noise", "rain"]), "corruptions.names"),
        (lambda r: r["evaluate"].__setitem__("baseline", "flip_x"), "evaluate"),
        (lambda r: r["data"].__setitem__("valid_loss_fraction", 1.5), "data.valid_loss_fraction"),
        (lambda r: r["evaluate"].__setitem__("selection", "greedy"), "evaluate.selection"),
        (lambda r: r["evaluate"].__setitem__("threshold", -0.5), "evaluate.threshold"),
        (lambda r: r["evaluate"].__setitem__("threshold", 0.5), "evaluate"),  # threshold needs selection eval_l2t
        (lambda r: r["evaluate"].__setitem__("protocol", "robustbench"), "evaluate.protocol"),
        (lambda r: r["evaluate"].__setitem__("batch_sizes", {"tent": 0}), "evaluate.batch_sizes.tent"),
        (lambda r: r["evaluate"].__setitem__("batch_sizes", {"gps_x": 8}), "evaluate"),  # not an evaluated method
    ],
)
def test_bad_values_name_the_key(raw: dict, mutate, key: str) -> None:
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("train_target", "arch", "resnet999", "known: preact_resnet18, resnet18, small_cnn"),
        ("train_target", "arch", "loss_predictor", "unknown target architecture 'loss_predictor'"),
        ("loss_dataset", "candidates", ["identity", "foo"], "unknown test-time action 'foo'; known: autocontrast"),
        ("loss_dataset", "candidates", ["identity", "zoom"], "'zoom' needs a magnitude"),
        ("loss_dataset", "candidates", ["identity", "identity"], "duplicate candidates ['identity']"),
        ("loss_dataset", "candidates", ["rotate:20"], "no 'identity' candidate"),
        ("loss_dataset", "candidates", [], "the candidate list is empty"),
        ("search_policy", "storage", "sqlit:///x.db", "sqlite:///policies/faa_search.db"),
        ("search_policy", "storage", "policies/faa_search.db", "not an RDB URL"),
    ],
)
def test_registry_names_are_checked_at_load(raw: dict, section: str, key: str, value, expected: str) -> None:
    """A value the stage would refuse later (build_model, build_candidates, Optuna's RDBStorage) is refused
    by check-params, on the key's own line, with the bad value and what is allowed."""
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    line = next(ln for ln in str(err.value).splitlines() if ln.strip().startswith(f"{section}.{key}:"))
    assert expected in line and f"(got {value!r})" in line


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train_target", "arch", "wrn_40_2"),
        ("loss_dataset", "candidates", "paper"),
        ("loss_dataset", "candidates", ["identity", "rotate:-20", "zoom:0.8+hflip", "identity+hflip"]),
        ("search_policy", "storage", "sqlite:///policies/faa_search.db"),
        ("search_policy", "storage", "postgresql://user:pass@host/db"),  # a known dialect; no server is contacted
        ("search_policy", "storage", "mysql+pymysql://user:pass@host/db"),
    ],
)
def test_good_registry_names_pass(raw: dict, section: str, key: str, value) -> None:
    raw[section][key] = value
    assert getattr(getattr(parse_params(raw), section), key) == value


def test_schema_literals_match_their_registries() -> None:
    """Keys typed as a Literal list a registry's names by hand: they must not drift from it."""
    from ltta.config import DataParams, EvaluateParams, SorterParams, TrainPredictorParams, TrainTargetParams
    from ltta.data.sources import SOURCES
    from ltta.training.modes.auxiliary import AUX_FAMILIES
    from ltta.predictor.trainer import OBJECTIVES, OPTIMIZERS
    from ltta.training.modes import TRAIN_MODES
    from ltta.tta import SELECTIONS, TTA_METHODS
    from ltta.predictor import RANKERS
    from ltta.predictor.sodeep import SORTERS
    from ltta.evaluation.protocols import PROTOCOLS

    def names(model: type, field: str) -> set[str]:
        ann = model.model_fields[field].annotation
        return set(typing.get_args(typing.get_args(ann)[0] if typing.get_origin(ann) is list else ann))

    pairs = [
        (names(DataParams, "source"), SOURCES), (names(TrainTargetParams, "mode"), TRAIN_MODES),
        (names(TrainTargetParams, "aux_families"), AUX_FAMILIES), (names(TrainPredictorParams, "optimizer"), OPTIMIZERS),
        (names(TrainPredictorParams, "objective"), OBJECTIVES), (names(TrainPredictorParams, "ranker"), RANKERS),
        (names(SorterParams, "model"), SORTERS), (names(EvaluateParams, "methods"), TTA_METHODS),
        (names(EvaluateParams, "selection"), SELECTIONS), (names(EvaluateParams, "protocol"), PROTOCOLS),
    ]
    for literal, registry in pairs:
        assert literal == set(registry.names()), (registry.kind, literal ^ set(registry.names()))


def test_importing_the_schema_stays_free_of_the_registries() -> None:
    """The registry checks import torch and SQLAlchemy lazily: the config module itself names neither."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, ltta.config; print(*(m in sys.modules for m in ('ltta.models', 'ltta.tta', 'sqlalchemy')))"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "False", "False"], proc.stderr


def test_npz_source_needs_a_path(raw: dict) -> None:
    raw["data"]["source"] = "npz"
    with pytest.raises(ParamsError, match="data.path"):
        parse_params(raw)


def test_cli_rejects_bad_params_before_writing_anything(tmp_path: Path, raw: dict, monkeypatch, capsys) -> None:
    raw["train_target"]["epochs"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-data"]) == 2
    assert "train_target.epochs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_cli_missing_params_file(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train-target"]) == 2
    assert "params.yaml not found" in capsys.readouterr().err


def test_ltta_params_writes_a_profile(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    assert main(["params", "profile=cifar100", "train_target.epochs=3", "--conf", str(ROOT / "conf"), "--out", str(out)]) == 0
    p = load_params(out)
    assert (p.profile, p.train_target.epochs) == ("cifar100", 3)
    assert main(["params", "--check", "--conf", str(ROOT / "conf"), "--out", str(out)]) == 1


@pytest.mark.parametrize("command", ["prepare-data", "train-target", "build-loss-dataset", "train-predictor", "search-policy",
                                     "search-gps", "fit-aggregation", "evaluate", "params"])
def test_every_command_has_help(command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ltta.cli", command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: ltta" in proc.stdout


@pytest.mark.parametrize("overrides", [[], ["profile=cifar100", "train_target.epochs=3"]])
def test_dvc_exp_run_composition_matches_ours(tmp_path: Path, overrides: list[str]) -> None:
    """`dvc exp run -S ...` composes conf/ through DVC's own Hydra helper: same params as `ltta params`."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(str(out), str(ROOT / "conf"), None, "config", str(ROOT), overrides)
    assert load_params(out) == compose_params(ROOT / "conf", overrides)


def test_dvc_config_enables_hydra() -> None:
    text = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text


def test_every_param_can_be_set_from_the_command_line(tmp_path: Path) -> None:
    """Hydra overrides (`ltta params key=value`, `dvc exp run -S key=value`) reach only keys that
    conf/config.yaml holds: a schema key missing there can be set by no user (train_target.source was)."""
    conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    params = load_params(ROOT / "params.yaml").model_dump()

    def missing(schema: dict, composed: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in schema.items():
            if key not in composed:
                out.append(prefix + key)
            elif isinstance(value, dict) and isinstance(composed[key], dict):
                out += missing(value, composed[key], f"{prefix}{key}.")
        return out

    assert missing(params, conf) == []
    out = subprocess.run([sys.executable, "-m", "ltta.cli", "params", "train_target.source=checkpoint:models/wrn.pt",
                          "corruptions.source=generated", "--conf", str(ROOT / "conf"), "--out", str(tmp_path / "p.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert load_params(tmp_path / "p.yaml").train_target.source == "checkpoint:models/wrn.pt"
