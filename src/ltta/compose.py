"""Compose params.yaml from ``conf/`` with Hydra, the way ``dvc exp run -S`` does.

``conf/config.yaml`` documents every key; ``conf/profile/*.yaml`` hold what a profile changes
(digits, cifar10, cifar100). The result is validated by the schema before it is written.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ltta.config import Params, parse_params
from ltta.io import write_text

HEADER = (
    "# Generated from conf/ by `ltta params` (or `dvc exp run -S ...`, which composes the same way).\n"
    "# Edit conf/config.yaml (documented defaults) or conf/profile/*.yaml, or override one key with\n"
    "# `dvc exp run -S key=value`; `ltta params profile=cifar100` switches the profile.\n"
)


def compose_params(conf_dir: Path, overrides: list[str]) -> Params:
    """Hydra composition of ``conf_dir/config.yaml`` with ``overrides``, then schema validation."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    conf = Path(conf_dir).resolve()
    if not (conf / "config.yaml").exists():
        raise FileNotFoundError(f"{conf / 'config.yaml'} not found: run from the project root or pass --conf")
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as exc:
        raise ValueError(f"cannot compose {conf} with {overrides}: {exc}") from None
    raw = OmegaConf.to_container(cfg, resolve=True)
    return parse_params(raw, f"composition of {conf} {overrides}")


def write_params(path: Path, params: Params) -> None:
    """Write ``params`` as YAML (key order of the schema), atomically."""
    body = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, default_flow_style=False, width=100)
    write_text(path, HEADER + body)
