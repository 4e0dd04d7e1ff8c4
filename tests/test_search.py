"""Policy files, batched policy application, and the Fast AutoAugment search on a tiny real problem."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from ltta.search import SearchSpec, fold_splits, policy_score, search_policy
from ltta.transforms.functional import random_crop_flip
from ltta.transforms.policy import (
    CompiledPolicy,
    OpSpec,
    Policy,
    apply_policy,
    apply_subpolicy,
    load_policy,
    remove_duplicate_subpolicies,
    save_policy,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only spin (50x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits, upscaled to 32x32 RGB in [0,1]."""
    d = load_digits()
    x = torch.from_numpy(d.images[:n]).float().div(16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target[:n]).long()


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(x: torch.Tensor, y: torch.Tensor, fold: int, steps: int = 100) -> nn.Module:
    """A real (tiny) training loop: full-batch Adam, seeded by the fold."""
    torch.manual_seed(100 + fold)
    model = _tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


X, Y = _digits()
POLICY = Policy(
    [
        [OpSpec("Rotate", 0.8, 0.5), OpSpec("Invert", 0.3, 0.0)],
        [OpSpec("Equalize", 0.6, 0.2), OpSpec("Cutout", 0.9, 1.0)],
        [OpSpec("ShearX", 1.0, 0.7)],
    ],
    meta={"note": "test"},
)


# ---------------------------------------------------------------- policy files


def test_policy_json_round_trip(tmp_path) -> None:
    path = tmp_path / "p.json"
    save_policy(path, POLICY)
    doc = json.loads(path.read_text())
    assert doc["format"] == "ltta-faa-policy" and doc["version"] == 1
    assert doc["subpolicies"][0][0] == {"op": "Rotate", "prob": 0.8, "level": 0.5}
    assert load_policy(path) == POLICY
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary behind


def _write(tmp_path, subpolicies, **top) -> str:  # noqa: ANN001
    doc = {"format": "ltta-faa-policy", "version": 1, "subpolicies": subpolicies, "meta": {}, **top}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_load_policy_rejects_bad_files(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown op 'Twirl'.*known ops: .*Rotate"):
        load_policy(_write(tmp_path, [[{"op": "Twirl", "prob": 0.5, "level": 0.5}]]))
    with pytest.raises(ValueError, match=r"sub-policy 0 op 1 prob must lie in \[0, 1\]"):
        load_policy(_write(tmp_path, [[{"op": "Rotate", "prob": 0.5, "level": 0.5},
                                       {"op": "Invert", "prob": 1.5, "level": 0.5}]]))
    with pytest.raises(ValueError, match="exactly the keys"):
        load_policy(_write(tmp_path, [[{"op": "Rotate", "p": 0.5, "level": 0.5}]]))
    with pytest.raises(ValueError, match="at least one sub-policy"):
        load_policy(_write(tmp_path, []))
    with pytest.raises(ValueError, match="'format' must be"):
        load_policy(_write(tmp_path, [[{"op": "Rotate", "prob": 0.5, "level": 0.5}]], format="other"))
    with pytest.raises(FileNotFoundError, match="search_policy"):
        load_policy(tmp_path / "missing.json")


def test_remove_duplicates_keys_on_op_names() -> None:
    subs = [[OpSpec("Rotate", 0.1, 0.1), OpSpec("Invert", 0.2, 0.2)],
            [OpSpec("Rotate", 0.9, 0.9), OpSpec("Invert", 0.9, 0.9)],
            [OpSpec("Invert", 0.5, 0.5), OpSpec("Rotate", 0.5, 0.5)]]
    assert remove_duplicate_subpolicies(subs) == [subs[0], subs[2]]


# ---------------------------------------------------------------- applying policies


def test_apply_policy_is_deterministic_and_changes_images() -> None:
    x = X[:64]
    a = apply_policy(x, POLICY, torch.Generator().manual_seed(0))
    b = apply_policy(x, POLICY, torch.Generator().manual_seed(0))
    c = apply_policy(x, POLICY, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a - x).abs().flatten(1).amax(1) > 0
    assert 0.5 < changed.float().mean() < 1.0  # most images change, a few draw no op
    assert torch.equal(x, X[:64])  # the input is not modified


def test_apply_policy_semantics() -> None:
    g = torch.Generator().manual_seed(0)
    x = X[:200]
    inv = Policy([[OpSpec("Invert", 1.0, 0.0)]])
    assert torch.equal(apply_policy(x, inv, g), 1 - x)
    assert torch.equal(apply_policy(x, Policy([[OpSpec("Invert", 0.0, 0.0)]]), g), x)
    # Two sub-policies, one inverting and one doing nothing: about half the images are inverted.
    half = Policy([[OpSpec("Invert", 1.0, 0.0)], [OpSpec("Invert", 0.0, 0.0)]])
    inverted = (apply_policy(x, half, g) == 1 - x).flatten(1).all(1).float().mean()
    assert 0.38 < float(inverted) < 0.62
    # apply_subpolicy: every image runs the sub-policy, each op with its probability.
    y = apply_subpolicy(x, [OpSpec("Invert", 0.25, 0.0)], g)
    assert 0.14 < float((y == 1 - x).flatten(1).all(1).float().mean()) < 0.36
    # ops in a sub-policy apply in order: Invert then Solarize(level 0 -> threshold 0: invert all)
    y = apply_subpolicy(x, [OpSpec("Invert", 1.0, 0.0), OpSpec("Solarize", 1.0, 0.0)], g)
    torch.testing.assert_close(y, x)
    # the dense (GPU) and subset strategies agree exactly when the ops draw no randomness
    photometric = Policy([[OpSpec("Equalize", 0.5, 0.3), OpSpec("Posterize", 0.7, 0.1)],
                          [OpSpec("Solarize", 0.6, 0.4), OpSpec("Contrast", 0.5, 0.9)]])
    compiled = CompiledPolicy(photometric)
    dense = compiled.apply(x, torch.Generator().manual_seed(2), strategy="dense")
    subset = compiled.apply(x, torch.Generator().manual_seed(2), strategy="subset")
    assert torch.equal(dense, subset) and not torch.equal(dense, x)
    # a compiled policy is an augmentation callable (x, generator) -> x
    compiled = CompiledPolicy(POLICY)
    assert torch.equal(compiled(x, torch.Generator().manual_seed(5)),
                       apply_policy(x, POLICY, torch.Generator().manual_seed(5)))


# ---------------------------------------------------------------- search


def test_fold_splits_are_stratified_and_disjoint() -> None:
    splits = fold_splits(Y, num_folds=3, fold_ratio=0.4, seed=0)
    assert len(splits) == 3
    for dm, da in splits:
        assert len(dm) == 180 and len(da) == 120 and not set(dm) & set(da)
        assert np.abs(np.bincount(Y[da].numpy(), minlength=10) / 120 - np.bincount(Y.numpy()) / 300).max() < 0.02
    assert not np.array_equal(splits[0][1], splits[1][1])


def test_policy_score_is_reproducible_and_exact_for_identity() -> None:
    dm, da = fold_splits(Y, 2, 0.4, 0)[0]
    model = _train(X[dm], Y[dm], 0)
    with torch.no_grad():
        plain = float((model(X[da]).argmax(1) == Y[da]).float().mean())
    assert plain > 0.85  # the tiny model really learned the digits
    identity = Policy([[OpSpec("Invert", 0.0, 0.0)]])
    got = policy_score(model, X[da], Y[da], identity, generator=torch.Generator().manual_seed(0),
                       num_copies=3, batch_size=50, post_augment=None)
    assert got == pytest.approx(plain)
    s1 = policy_score(model, X[da], Y[da], POLICY, generator=torch.Generator().manual_seed(7), num_copies=5,
                      batch_size=50, post_augment=random_crop_flip)
    s2 = policy_score(model, X[da], Y[da], POLICY, generator=torch.Generator().manual_seed(7), num_copies=5,
                      batch_size=50, post_augment=random_crop_flip)
    assert s1 == s2
    one = policy_score(model, X[da], Y[da], POLICY, generator=torch.Generator().manual_seed(7), num_copies=1,
                       batch_size=50, post_augment=random_crop_flip)
    assert 0.0 < one < 1.0 and s1 >= one - 0.1  # more copies: more chances to be right


class _Interrupt(Exception):
    pass


def test_search_end_to_end_and_resume(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    trained: list[int] = []
    seen: list[tuple[int, int, float]] = []

    def train_fn(x: torch.Tensor, y: torch.Tensor, fold: int) -> nn.Module:
        assert x.shape[0] == 180 and y.shape[0] == 180
        trained.append(fold)
        return _train(x, y, fold)

    spec = SearchSpec(num_folds=2, fold_ratio=0.4, num_trials=4, num_policies=3, num_ops=2, top_n=2, seed=0,
                      batch_size=128)
    kwargs = dict(train_fn=train_fn, storage=storage, study_name="t")

    def crash_after_three(fold: int, trial: int, score: float) -> None:
        seen.append((fold, trial, score))
        if len(seen) == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):  # the search is "killed" after its third stored trial
        search_policy(X, Y, spec, on_trial=crash_after_three, **kwargs)
    assert trained == [0] and [(f, t) for f, t, _ in seen] == [(0, 0), (0, 1), (0, 2)]
    first = list(seen)

    trained.clear()
    seen.clear()
    policy, history = search_policy(X, Y, spec, on_trial=lambda f, t, s: seen.append((f, t, s)), **kwargs)
    # only the missing trials ran: one more in fold 0, four in fold 1
    assert [(f, t) for f, t, _ in seen] == [(0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert trained == [0, 1]
    assert [(h["fold"], h["trial"]) for h in history] == [(f, t) for f in range(2) for t in range(4)]
    assert [(h["fold"], h["trial"], h["score"]) for h in history[:3]] == first  # stored results kept
    assert all(0.0 <= h["score"] <= 1.0 for h in history)
    # the final policy: top 2 trials of each fold, 3 sub-policies each, de-duplicated per trial
    assert 2 <= len(policy) <= 2 * 2 * 3
    assert all(len(sub) == 2 for sub in policy.subpolicies)
    for fold in range(2):
        scores = sorted((h["score"] for h in history if h["fold"] == fold), reverse=True)
        assert policy.meta["folds"][fold]["best_score"] == scores[0]
        assert policy.meta["folds"][fold]["top_n_mean_score"] == pytest.approx(np.mean(scores[:2]))
    save_policy(tmp_path / "policy.json", policy)
    assert load_policy(tmp_path / "policy.json") == policy

    # a finished search reruns nothing and gives the same policy
    trained.clear()
    seen.clear()
    again, history2 = search_policy(X, Y, spec, on_trial=lambda f, t, s: seen.append((f, t, s)), **kwargs)
    assert trained == [] and seen == []
    assert again == policy and history2 == history
