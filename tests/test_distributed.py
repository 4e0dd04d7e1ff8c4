"""Data-parallel target training under torchrun: 2 CPU processes with gloo on 127.0.0.1.

The tests launch this file itself through ``python -m torch.distributed.run`` (the ``torchrun``
launcher), so the processes see exactly what ``torchrun ... -m ltta.cli train-target`` gives the
stage: RANK/WORLD_SIZE/LOCAL_RANK, MASTER_ADDR/MASTER_PORT. Each launch below is what one such
process runs; rank 0 writes what the test then checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltta.models import build_model
from ltta.training import TrainConfig, train_classifier
from ltta.training.distributed import BatchShard, distributed_session

# A run on 2 processes matches one process up to the order of float sums (DDP averages the two
# shard gradients where one process reduces over the whole batch). After the 16 SGD steps below
# the weights differed by at most 5e-8 (4e-7 relative) on CPU; the bounds leave 20x room, while
# other augmentation draws (cutout 5 instead of 6) move them by 2e-3 and a learning rate 0.2%
# higher by 1e-4.
ATOL, RTOL = 1e-6, 1e-5

EXACT_CFG = dict(epochs=2, batch_size=32, lr=0.05, augment="standard", cutout=6, seed=5)
BN_CFG = dict(epochs=3, batch_size=64, lr=0.05, seed=3)


def _digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: scikit-learn's digits upscaled to 16x16 RGB in [0,1]."""
    from sklearn.datasets import load_digits  # here: the processes torchrun starts read data.pt instead

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target[:n], dtype=torch.int64)


def _plain_net() -> nn.Module:
    """No batch norm, no dropout: nothing that legitimately differs between 1 and 2 processes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def _bn_net() -> nn.Module:
    """WRN-10-1: batch norm, and dropout drawing from each process's own stream."""
    torch.manual_seed(123)
    return build_model("wrn", depth=10, widen_factor=1, num_classes=10, dropout=0.2)


# ---------------------------------------------------------------- what each process runs


def _record_saves(out: Path, rank: int, tag: str) -> None:
    """Wrap the trainer's checkpoint writer to note which process called it (then write as usual)."""
    import ltta.checkpoint as target

    real = getattr(target.save_torch, "__wrapped__", target.save_torch)

    def save_torch(path: Path, obj: dict) -> None:
        with open(out / f"{tag}_saved_by_rank{rank}.txt", "a") as fh:
            fh.write(f"{obj['epoch']}\n")
        real(path, obj)

    save_torch.__wrapped__ = real  # type: ignore[attr-defined]
    target.save_torch = save_torch


def _launch_first(out: Path, rank: int) -> None:
    """The 1-vs-2-process comparison, an uninterrupted batch-norm run, then a batch-norm run whose
    rank 0 dies hard right after epoch 1's checkpoint (torchrun then stops rank 1)."""
    x, y = torch.load(out / "data.pt")
    try:  # 33 images per step cannot split over 2 processes: refused before any collective
        train_classifier(_plain_net(), x, y, TrainConfig(**{**EXACT_CFG, "batch_size": 33}), progress=False)
    except ValueError as exc:
        (out / f"bad_batch_rank{rank}.txt").write_text(str(exc))

    _record_saves(out, rank, "exact")
    model = _plain_net()
    history = train_classifier(model, x, y, TrainConfig(**EXACT_CFG), checkpoint_path=out / "exact.ckpt", progress=False)
    torch.save(model.state_dict(), out / f"exact_weights_rank{rank}.pt")
    (out / f"exact_history_rank{rank}.json").write_text(json.dumps(history))

    fresh = _bn_net()
    fresh_history = train_classifier(fresh, x, y, TrainConfig(**BN_CFG), progress=False)
    torch.save(fresh.state_dict(), out / f"bn_fresh_weights_rank{rank}.pt")
    (out / f"bn_fresh_history_rank{rank}.json").write_text(json.dumps(fresh_history))

    def die(record: dict) -> None:
        if record["epoch"] == 1:
            os._exit(17)

    _record_saves(out, rank, "bn")
    train_classifier(_bn_net(), x, y, TrainConfig(**BN_CFG), checkpoint_path=out / "bn.ckpt", on_epoch=die, progress=False)


def _launch_resume(out: Path, rank: int) -> None:
    """The killed batch-norm run, relaunched: it resumes from rank 0's checkpoint of epoch 1."""
    x, y = torch.load(out / "data.pt")
    _record_saves(out, rank, "bn")
    resumed = _bn_net()
    history = train_classifier(resumed, x, y, TrainConfig(**BN_CFG), checkpoint_path=out / "bn.ckpt", progress=False)
    torch.save(resumed.state_dict(), out / f"bn_resumed_weights_rank{rank}.pt")
    (out / f"bn_resumed_history_rank{rank}.json").write_text(json.dumps(history))


LAUNCHES: dict[str, Callable[[Path, int], None]] = {"first": _launch_first, "resume": _launch_resume}


def _worker_main(launch: str, out: str) -> None:
    torch.set_num_threads(1)
    with distributed_session("cpu") as proc:
        assert proc.world_size == 2 and torch.distributed.get_backend() == "gloo"
        LAUNCHES[launch](Path(out), proc.rank)


# ---------------------------------------------------------------- the tests


def _launcher() -> list[str]:
    """torchrun for 2 processes on 127.0.0.1 (imported here: the processes it starts lack ``tests``)."""
    from tests.conftest import free_port

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max_restarts=0",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
    ]  # fmt: skip


def _torchrun(launch: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [*_launcher(), __file__, launch, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both torchrun launches (the first ends with its killed run, the second resumes it)."""
    out = tmp_path_factory.mktemp("ddp")
    torch.save(_digits(), out / "data.pt")
    first = _torchrun("first", out)
    assert first.returncode != 0 and (out / "bn_fresh_weights_rank1.pt").exists(), _report(first)
    assert torch.load(out / "bn.ckpt", weights_only=True)["epoch"] == 1  # written just before the kill
    resume = _torchrun("resume", out)
    assert resume.returncode == 0, _report(resume)
    return out


def test_two_processes_match_one_process(ddp_runs: Path) -> None:
    """Same seed, same global batch: 2 gloo processes end where one process ends (no BN, no dropout)."""
    x, y = torch.load(ddp_runs / "data.pt")
    single = _plain_net()
    single_history = train_classifier(single, x, y, TrainConfig(**EXACT_CFG), progress=False)

    ranks = [torch.load(ddp_runs / f"exact_weights_rank{r}.pt") for r in (0, 1)]
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the two processes"
        torch.testing.assert_close(ranks[0][name], value, atol=ATOL, rtol=RTOL, msg=f"{name}: 2 processes vs 1")

    history = json.loads((ddp_runs / "exact_history_rank0.json").read_text())
    assert history == json.loads((ddp_runs / "exact_history_rank1.json").read_text())  # rank 0's figures everywhere
    for ddp, one in zip(history, single_history, strict=True):
        assert ddp["epoch"] == one["epoch"] and ddp["lr"] == pytest.approx(one["lr"], rel=1e-12)
        # All-reduced over both shards: the global batch's loss and error, as one process logs them.
        assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert ddp["train_error"] == pytest.approx(one["train_error"], abs=1 / 256)


def test_rank_zero_alone_writes_the_checkpoint(ddp_runs: Path) -> None:
    assert (ddp_runs / "exact_saved_by_rank0.txt").read_text().split() == ["1", "2"]
    assert not (ddp_runs / "exact_saved_by_rank1.txt").exists()
    ckpt = torch.load(ddp_runs / "exact.ckpt", weights_only=True)
    weights = torch.load(ddp_runs / "exact_weights_rank0.pt")
    assert ckpt["epoch"] == 2 and all(torch.equal(v, weights[k]) for k, v in ckpt["model"].items())
    # The killed batch-norm run saved epoch 1; relaunched, it went on from epoch 2.
    assert (ddp_runs / "bn_saved_by_rank0.txt").read_text().split() == ["1", "2", "3"]
    assert not (ddp_runs / "bn_saved_by_rank1.txt").exists()


def test_batch_size_that_does_not_split_is_refused(ddp_runs: Path) -> None:
    for r in (0, 1):
        msg = (ddp_runs / f"bad_batch_rank{r}.txt").read_text()
        assert "33 images" in msg and "2 processes" in msg and "multiple of 2" in msg


def test_batch_norm_model_trains_and_resumes_exactly_under_ddp(ddp_runs: Path) -> None:
    """WRN-10-1 (batch norm, dropout) on 2 processes learns, and the run killed after epoch 1 and
    relaunched ends bitwise equal to the uninterrupted 2-process run."""
    fresh = [torch.load(ddp_runs / f"bn_fresh_weights_rank{r}.pt") for r in (0, 1)]
    resumed = torch.load(ddp_runs / "bn_resumed_weights_rank0.pt")
    for name, value in fresh[0].items():
        assert torch.equal(resumed[name], value), f"{name}: resumed run differs from the uninterrupted one"
        if "running" not in name and "num_batches" not in name:  # batch-norm statistics are per process
            assert torch.equal(fresh[1][name], value), f"{name} differs between the two processes"
    history = json.loads((ddp_runs / "bn_fresh_history_rank0.json").read_text())
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[0]
    resumed_history = json.loads((ddp_runs / "bn_resumed_history_rank0.json").read_text())
    assert [h["train_loss"] for h in resumed_history] == losses


@pytest.mark.slow
def test_train_target_stage_under_torchrun(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m ltta.cli train-target` on CPU: rank 0 writes the outputs and
    one MLflow run; another stage refuses to run under torchrun."""
    import mlflow
    import yaml

    from ltta.config import parse_params
    from ltta.stages import prepare_data
    from ltta.stages.base import Paths
    from tests.conftest import tiny_params

    raw = tiny_params(train_target={"epochs": 2, "batch_size": 64})
    raw["tracking"]["experiment"] = "ddp-stage"
    prepare_data.run(parse_params(raw), Paths(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    launcher = [*_launcher(), "-m", "ltta.cli"]

    done = subprocess.run([*launcher, "train-target"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, _report(done)
    metrics = json.loads((tmp_path / "metrics" / "target.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test_error"] <= 100.0
    curve = (tmp_path / "plots" / "target_curve.csv").read_text().splitlines()
    losses = [float(row.split(",")[1]) for row in curve[1:]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert (tmp_path / "models" / "target.pt").exists() and not list((tmp_path / "checkpoints").glob("*.pt"))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["ddp-stage"], output_format="list")
    assert [r.info.run_name for r in runs] == ["train_target"]  # rank 0's run only
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train_loss")] == [1, 2]

    refused = subprocess.run([*launcher, "evaluate"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "runs as one process" in refused.stdout + refused.stderr


def test_single_process_is_untouched() -> None:
    """Without a process group the shard is the whole batch and the shared generator is used as is."""
    shard = BatchShard.current(seed=0, device="cpu")
    assert (shard.rank, shard.world_size, shard.is_main, shard.active) == (0, 1, True, False)
    batch = torch.arange(6)
    assert shard.local(batch) is batch
    shared = torch.Generator().manual_seed(1)
    assert shard.epoch_generator(shared, epoch=3) is shared
    model = nn.Linear(2, 2)
    assert shard.wrap(model) is model
    shard.check_batch(33, 1000)  # any batch splits over one process


def test_shards_tile_the_global_batch() -> None:
    batch = torch.arange(12)
    parts = [BatchShard(r, 3, seed=0, device="cpu").local(batch) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch) and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="only 10 images.*multiple of 4"):
        BatchShard(1, 4, seed=0, device="cpu").check_batch(10, 10)


if __name__ == "__main__":  # a process started by torchrun in the tests above
    _worker_main(sys.argv[1], sys.argv[2])
