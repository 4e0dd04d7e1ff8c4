"""Candidate transforms, the predictor's loss dataset, and the TTA methods (tiny real target on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import ltta.transforms.functional as TF
from ltta.models.loss_predictor import LossPredictor
from ltta.models.small_cnn import SmallCNN
from ltta.models.inference import predict_proba
from ltta.transforms.policy import OpSpec, Policy
from ltta.tta.candidates import grouped_views
from ltta.tta import (
    PAPER_ACTIONS,
    SELECTIONS,
    TTA_METHODS,
    apply_candidate,
    build_candidates,
    build_method,
    flops_per_image,
    identity_index,
    mirror_permutation,
    parse_candidate,
)
from ltta.predictor import candidate_losses, copies_per_image, flip_ensemble_probs, predictor_training_inputs


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Random low-frequency images on 8-bit levels (so PIL comparisons are fair)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    x = F.interpolate(low, size=32, mode="bicubic", align_corners=False).clamp(0, 1)
    return x.mul(255).round().div(255)


@pytest.fixture(scope="module")
def target() -> SmallCNN:
    """A small CNN trained for a few steps to tell which colour channel dominates."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, width=4)
    x = smooth_images(192, 1)
    y = x.mean(dim=(2, 3)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = smooth_images(24, 2)
    return x, x.mean(dim=(2, 3)).argmax(1)


# ---------------------------------------------------------------- candidates


def test_candidate_sets() -> None:
    cands = build_candidates("all")
    assert len(cands) == 24
    assert [c.name for c in cands[:12]] == list(PAPER_ACTIONS)
    assert [c.name for c in cands[12:]] == [a + "+hflip" for a in PAPER_ACTIONS]
    assert identity_index(cands) == 0
    paper = build_candidates("paper")
    assert len(paper) == 12 and not any(c.flip for c in paper)
    x = smooth_images(3, 0)
    assert torch.equal(apply_candidate(x, cands[0]), x)
    assert torch.equal(apply_candidate(x, cands[12]), x.flip(-1))
    zoom_flip = parse_candidate("zoom:1.2+hflip")
    assert torch.equal(apply_candidate(x, zoom_flip), apply_candidate(x, parse_candidate("zoom:1.2")).flip(-1))
    for bad in ["rotate", "identity:2", "warp:3", "zoom:abc"]:
        with pytest.raises((ValueError, KeyError)):
            build_candidates([bad])
    with pytest.raises(ValueError, match="duplicate"):
        build_candidates(["identity", "identity"])


def _pil_reference(img: np.ndarray, name: str) -> np.ndarray:
    """The public code's action on a mirror-expanded PIL image, cropped at the exact centre."""
    big = Image.fromarray(np.pad(img, ((32, 32), (32, 32), (0, 0)), mode="symmetric"))
    family, _, mag = name.partition(":")
    if family == "rotate":
        out = big.rotate(float(mag), resample=Image.BICUBIC)
    elif family == "zoom":
        size = int(96 * float(mag))
        out = big.resize((size, size), Image.BICUBIC)
    elif family == "sharpness":
        out = ImageEnhance.Sharpness(big).enhance(float(mag))
    elif family == "color":
        out = ImageEnhance.Color(big).enhance(float(mag))
    else:
        out = ImageOps.autocontrast(big)
    arr = np.asarray(out)
    off = (arr.shape[0] - 32) // 2
    return arr[off : off + 32, off : off + 32].astype(np.float64)


@pytest.mark.parametrize(
    ("name", "tol"),
    [("rotate:20", 2.5), ("rotate:-20", 2.5), ("zoom:0.75", 3.0), ("zoom:1.25", 3.0), ("autocontrast", 0.5),
     ("sharpness:3", 1.0), ("sharpness:0.2", 1.0), ("color:2", 0.5)],
)
def test_actions_match_pil_on_mirror_expanded_image(name: str, tol: float) -> None:
    """Same direction and magnitude as the public code (bicubic kernels differ: a=-0.5 vs -0.75)."""
    x = smooth_images(1, 5)
    img = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ours = apply_candidate(x, parse_candidate(name))[0].permute(1, 2, 0).numpy() * 255
    diff = np.abs(ours - _pil_reference(img, name)).mean()
    assert diff < tol, f"{name}: mean abs difference {diff:.2f} levels"
    assert np.abs(ours - img).mean() > 0.5 or name == "autocontrast"  # the action does something


def test_mirror_permutation_aligns_flipped_views() -> None:
    x = smooth_images(2, 3)
    cands = build_candidates("all")
    perm = mirror_permutation(cands)
    for i, c in enumerate(cands):
        mirrored = apply_candidate(x, cands[int(perm[i])])
        torch.testing.assert_close(apply_candidate(x.flip(-1), c), mirrored, atol=1e-5, rtol=0)
    # Without flip candidates: the public code's swap of r-20 and r20 only.
    assert mirror_permutation(build_candidates("paper")).tolist() == [0, 2, 1, *range(3, 12)]


def test_flip_ensemble_on_the_paper_set_swaps_only_the_rotations() -> None:
    """The 12 flip-free actions: the mirror image's scores come back with r-20 and r20 swapped, as eval_l2t.py does."""
    cands = build_candidates("paper")
    torch.manual_seed(5)
    predictor = LossPredictor(num_outputs=12, width=4).eval()
    x = smooth_images(6, 8)
    s = predictor(x).softmax(1)
    s_flip = predictor(x.flip(-1)).softmax(1)
    s_flip[:, [1, 2]] = s_flip[:, [2, 1]]  # rotate:-20 <-> rotate:20 (the set's order: identity, r-20, r20, ...)
    assert [c.name for c in cands[1:3]] == ["rotate:-20", "rotate:20"]
    torch.testing.assert_close(flip_ensemble_probs(predictor, x, cands), (s + s_flip) / 2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="outputs"):
        flip_ensemble_probs(predictor, x, build_candidates("all"))


# ---------------------------------------------------------------- loss dataset


def test_predictor_training_inputs() -> None:
    x = smooth_images(5, 4)
    kw = dict(corruptions=["gaussian_noise", "contrast"], severities=(3,))
    a = predictor_training_inputs(x, torch.Generator().manual_seed(0), **kw)
    b = predictor_training_inputs(x, torch.Generator().manual_seed(0), **kw)
    c = predictor_training_inputs(x, torch.Generator().manual_seed(1), **kw)
    assert a.shape == (copies_per_image(3, "both") * 5, 3, 32, 32) == (30, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, a.mul(255).round().div(255))  # on 8-bit levels
    # Neutral settings: the images themselves; "both" puts the flipped copy right after.
    plain = predictor_training_inputs(x, torch.Generator(), duplication=2, p_aug=0.0, corruptions=[])
    assert torch.equal(plain[:5], x) and torch.equal(plain[5:10], x.flip(-1)) and torch.equal(plain[10:15], x)
    # Every row corrupted at p_aug = 1 (the validation recipe: one unflipped copy, no deformation).
    val = predictor_training_inputs(x, torch.Generator().manual_seed(0), duplication=1, flips="none",
                                    deform=False, p_aug=1.0, **kw)
    assert val.shape == x.shape
    assert bool(((val - x).abs().flatten(1).amax(1) > 0.02).all())
    with pytest.raises(KeyError, match="corruption"):
        predictor_training_inputs(x, torch.Generator(), corruptions=["no_such_corruption"])


def test_candidate_losses_one_pass_per_candidate(target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    cands = build_candidates("all")
    calls = []
    handle = target.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        losses, correct = candidate_losses(target, x, y, cands, batch_size=64)
    finally:
        handle.remove()
    assert calls == [x.shape[0]] * len(cands)  # one batched pass per candidate
    assert losses.shape == correct.shape == (24, 24)
    assert losses.dtype == torch.float32 and correct.dtype == torch.bool
    with torch.no_grad():
        for j in (0, 2, 17):
            logits = target(apply_candidate(x, cands[j]))
            torch.testing.assert_close(losses[:, j], F.cross_entropy(logits, y, reduction="none"), atol=1e-4, rtol=1e-4)
            assert torch.equal(correct[:, j], logits.argmax(1) == y)
    assert not torch.equal(losses[:, 0], losses[:, 1])  # rotating changes the loss


# ---------------------------------------------------------------- methods


def _nll(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log(probs.gather(1, y[:, None]).squeeze(1))


def test_none_flip_and_crops_equal_manual_averages(target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = data
    p = lambda v: predict_proba(target, v)  # noqa: E731
    torch.testing.assert_close(build_method("none", target).predict(x), p(x))
    flip = build_method("flip", target)
    assert flip.forward_passes == 2
    torch.testing.assert_close(flip.predict(x), (p(x) + p(x.flip(-1))) / 2)
    # Crops: corners of the 36x36 centre window of the mirror expansion (2-pixel shifts).
    padded = TF.mirror_pad(x, 2)
    corners = [padded[..., :32, :32], padded[..., :32, 4:], padded[..., 4:, :32], padded[..., 4:, 4:], x]
    five = sum(p(v) for v in corners) / 5
    five_crop, ten_crop = build_method("five_crop", target), build_method("ten_crop", target)
    assert (five_crop.forward_passes, ten_crop.forward_passes) == (5, 10)
    torch.testing.assert_close(five_crop.predict(x), five)
    ten = (five * 5 + sum(p(v.flip(-1)) for v in corners)) / 10
    torch.testing.assert_close(ten_crop.predict(x), ten)


def test_oracle_is_never_worse_than_any_candidate(target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    cands = build_candidates("all")
    losses, _ = candidate_losses(target, x, y, cands, batch_size=64)
    oracle = build_method("oracle", target, candidates=cands)
    assert oracle.forward_passes == 24
    nll = _nll(oracle.predict(x, y), y)
    assert bool((nll[:, None] <= losses + 1e-5).all())
    torch.testing.assert_close(nll, losses.min(1).values, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        oracle.predict(x)
    with pytest.raises(ValueError, match="exceeds"):  # refused when built, before any work
        build_method("oracle", target, candidates=cands, k=25)


def test_learned_selection_and_full_k(target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = data
    cands = build_candidates("all")
    torch.manual_seed(3)
    predictor = LossPredictor(num_outputs=24, width=4).eval()
    full = build_method("learned", target, candidates=cands, k=24, predictor=predictor)
    manual = sum(predict_proba(target, apply_candidate(x, c)) for c in cands) / 24
    torch.testing.assert_close(full.predict(x), manual, atol=1e-6, rtol=1e-5)
    one = build_method("learned", target, candidates=cands, k=1, predictor=predictor)
    choice = flip_ensemble_probs(predictor, x, cands).argmax(1)
    assert torch.equal(one.selection(x)[:, 0], choice)
    views = torch.cat([apply_candidate(x[i : i + 1], cands[int(c)]) for i, c in enumerate(choice)])
    expected = predict_proba(target, views)
    torch.testing.assert_close(one.predict(x), expected, atol=1e-6, rtol=1e-5)
    ratio = flops_per_image(predictor, 32) / flops_per_image(target, 32)  # k plus two predictor runs
    assert one.forward_passes == pytest.approx(1 + 2 * ratio) and ratio > 0
    with pytest.raises(ValueError, match="outputs"):
        build_method("learned", target, candidates="paper", predictor=predictor).predict(x)


def _public_greedy(probs: list[float], k: int, identity: int, th: float) -> list[int]:
    """eval_l2t.py ``AugmentorLearned``'s pick loop, one image at a time, in plain Python."""
    probs = list(probs)
    picks = []
    for _ in range(k):
        best = max(range(len(probs)), key=lambda i: (probs[i], -i))  # argmax: first of ties
        if probs[best] < th * probs[identity]:
            best = identity
        if best != identity:
            probs[best] = 0.0
        picks.append(best)
    return picks


@pytest.mark.parametrize("threshold", [0.0, 0.9, 1.5])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_eval_l2t_selection_matches_the_public_pick_loop(k: int, threshold: float) -> None:
    g = torch.Generator().manual_seed(k)
    scores = torch.rand(64, 12, generator=g).softmax(1)
    scores[::4, 3] = 1.0  # identity (column 3 here) best for every 4th image: it then fills every place
    got = SELECTIONS.get("eval_l2t")(scores, k, 3, threshold)
    expected = [_public_greedy(row, k, 3, threshold) for row in scores.tolist()]
    assert got.tolist() == expected
    assert (got[::4] == 3).all()
    if threshold == 0.0:  # without the fallback the picks up to identity are the top-k's
        top = SELECTIONS.get("topk")(scores, k, 3, 0.0)
        no_identity = ~(top == 3).any(1)
        assert torch.equal(got[no_identity], top[no_identity])


def test_eval_l2t_selection_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.05], [0.2, 0.25, 0.15, 0.4], [0.3, 0.32, 0.29, 0.09]])
    pick = SELECTIONS.get("eval_l2t")
    # identity is column 0; image 2 reaches it second, so it also takes the third place
    assert pick(scores, 3, 0, 0.0).tolist() == [[1, 2, 0], [3, 1, 0], [1, 0, 0]]
    # threshold 1.1: image 2's best (0.32) is under 1.1 x identity's 0.3, so identity in both places
    assert pick(scores, 2, 0, 1.1).tolist() == [[1, 2], [3, 1], [0, 0]]
    assert SELECTIONS.get("topk")(scores, 3, 0, 0.0).tolist() == [[1, 2, 0], [3, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="eval_l2t"):
        SELECTIONS.get("topk")(scores, 2, 0, 0.5)
    with pytest.raises(ValueError, match="identity"):
        pick(scores, 2, -1, 0.0)


def test_learned_eval_l2t_averages_identity_as_often_as_it_was_picked(
    target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = data
    cands = build_candidates("all")
    torch.manual_seed(3)
    predictor = LossPredictor(num_outputs=24, width=4).eval()
    method = build_method("learned", target, candidates=cands, k=3, predictor=predictor, selection="eval_l2t",
                          threshold=10.0)  # every pick falls back: k identity views = no TTA
    assert (method.selection(x) == identity_index(cands)).all()
    torch.testing.assert_close(method.predict(x), predict_proba(target, x), atol=1e-6, rtol=1e-5)
    assert method.forward_passes == build_method("learned", target, candidates=cands, k=3, predictor=predictor).forward_passes
    with pytest.raises(ValueError, match="eval_l2t"):
        build_method("learned", target, candidates=cands, k=3, predictor=predictor, threshold=0.5)
    with pytest.raises(KeyError):
        build_method("learned", target, candidates=cands, k=3, predictor=predictor, selection="nearest")


def test_prior_uses_the_same_best_on_average_candidates_for_every_image(
    target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = data
    cands = build_candidates("all")
    prior = torch.zeros(24)
    prior[[5, 2, 17]] = torch.tensor([3.0, 2.0, 1.0])  # candidates 5, 2, 17 are best on average
    method = build_method("prior", target, candidates=cands, k=2, prior=prior)
    assert method.forward_passes == 2 and method.chosen_names == [cands[5].name, cands[2].name]
    expected = (predict_proba(target, apply_candidate(x, cands[5])) + predict_proba(target, apply_candidate(x, cands[2]))) / 2
    torch.testing.assert_close(method.predict(x), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="needs prior"):
        build_method("prior", target, candidates=cands, k=2)
    with pytest.raises(ValueError, match="one score per candidate"):
        build_method("prior", target, candidates=cands, k=2, prior=prior[:5])
    with pytest.raises(ValueError, match="exceeds"):
        build_method("prior", target, candidates=cands, k=25, prior=prior)


def test_random_is_seeded(target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = data
    def run(seed: int) -> torch.Tensor:
        return build_method("random", target, k=3, generator=torch.Generator().manual_seed(seed)).predict(x)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.sum(1), torch.ones(x.shape[0]))
    assert build_method("random", target, k=3).forward_passes == 3


def test_policy_method_averages_identity_and_subpolicies(
    target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = data
    policy = Policy([[OpSpec("Invert", 1.0, 0.5)], [OpSpec("Solarize", 1.0, 0.0)], [OpSpec("Equalize", 1.0, 0.5)]])
    method = build_method("policy", target, k=2, policy=policy)
    assert method.forward_passes == 3
    inv = 1.0 - x  # Invert, and Solarize at level 0 (threshold 0) inverts every pixel too
    expected = (predict_proba(target, x) + 2 * predict_proba(target, inv)) / 3
    torch.testing.assert_close(method.predict(x), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="sub-policies"):
        build_method("policy", target, k=5, policy=policy)


def test_registry_lists_methods(target: SmallCNN) -> None:
    expected = {"none", "flip", "five_crop", "ten_crop", "random", "policy", "learned", "prior", "oracle", "feat_pick", "bn_adapt", "tent",
                "gps", "agg_aug", "agg_class"}
    assert set(TTA_METHODS.names()) == expected
    with pytest.raises(KeyError, match="known"):
        build_method("magic", target)
    with pytest.raises(ValueError, match="predictor"):
        build_method("learned", target)


def test_grouped_views_equal_apply_candidate() -> None:
    """Family-batched views are exactly the per-candidate views, in candidate-grouped rows."""
    cands = build_candidates(
        ["identity", "autocontrast+hflip", "zoom:0.8", "zoom:1.2+hflip", "rotate:-20", "rotate:20+hflip",
         "autocontrast", "sharpness:3", "color:0.5+hflip", "color:2", "brightness:1.5", "identity+hflip"]
    )
    x = smooth_images(10, 4)
    sizes = [3, 2, 0, 4, 1, 5, 2, 0, 3, 1, 2, 4]  # empty groups too
    image_index = torch.randint(0, 10, (sum(sizes),), generator=torch.Generator().manual_seed(0))
    views = grouped_views(x, cands, image_index, sizes)
    start = 0
    for cand, size in zip(cands, sizes):
        rows = slice(start, start + size)
        if size:
            assert torch.equal(views[rows], apply_candidate(x[image_index[rows]], cand)), cand.name
        start += size
    with pytest.raises(ValueError, match="group sizes"):
        grouped_views(x, cands, image_index, sizes[:-1])


def test_per_image_choices_run_the_target_in_full_batches(
    target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """random / learned score their N x k views in one target call; the values match a per-image loop."""
    x, y = data[0][:12], data[1][:12]
    n, k = x.shape[0], 3
    cands = build_candidates("all")
    torch.manual_seed(3)
    predictor = LossPredictor(num_outputs=24, width=4).eval()
    rand = build_method("random", target, candidates=cands, k=k, generator=torch.Generator().manual_seed(7))
    learned = build_method("learned", target, candidates=cands, k=k, predictor=predictor)  # counts FLOPs once
    calls: list[int] = []
    handle = target.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        out_random = rand.predict(x)
        assert calls == [n * k]
        calls.clear()
        out_learned = learned.predict(x)
        assert calls == [n * k]
        calls.clear()
        build_method("oracle", target, candidates=cands, batch_size=256).predict(x, y)
        assert calls == [256, n * 24 - 256]  # all 24 candidates' views in full batches
    finally:
        handle.remove()
    sel_random = torch.randint(0, 24, (n, k), generator=torch.Generator().manual_seed(7))  # the same draws
    for sel, out in ((sel_random, out_random), (learned.selection(x), out_learned)):
        views = torch.cat([apply_candidate(x[i : i + 1], cands[int(c)]) for i in range(n) for c in sel[i]])
        manual = predict_proba(target, views).view(n, k, -1).mean(1)  # each image's own k views
        torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-5)
    # A small batch size splits images and views into many slices; the values do not change.
    gen = torch.Generator().manual_seed(7)
    small = build_method("random", target, candidates=cands, k=k, generator=gen, batch_size=2)
    torch.testing.assert_close(small.predict(x), out_random, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu(target: SmallCNN, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Views, losses and methods run on the GPU and agree with the CPU (fp32: amp off)."""
    x, y = data
    dev = torch.device("cuda")
    gpu_target = SmallCNN(num_classes=3, width=4).to(dev).eval()
    gpu_target.load_state_dict(target.state_dict())
    cands = build_candidates("all")
    l_cpu, _ = candidate_losses(target, x, y, cands, batch_size=64)
    l_gpu, _ = candidate_losses(gpu_target, x.to(dev), y.to(dev), cands, batch_size=64, amp=False)
    assert l_gpu.device.type == "cuda"
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, atol=2e-3, rtol=2e-3)
    torch.manual_seed(3)
    predictor = LossPredictor(num_outputs=24, width=4).eval()
    gpu_predictor = LossPredictor(num_outputs=24, width=4).to(dev).eval()
    gpu_predictor.load_state_dict(predictor.state_dict())
    for name in ("flip", "ten_crop", "learned", "oracle"):
        cpu_m = build_method(name, target, candidates=cands, k=2, predictor=predictor)
        gpu_m = build_method(name, gpu_target, candidates=cands, k=2, predictor=gpu_predictor, amp=False)
        out = gpu_m.predict(x.to(dev), y.to(dev))
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), cpu_m.predict(x, y), atol=2e-3, rtol=2e-3)
    gen = torch.Generator(device=dev).manual_seed(0)
    xa = predictor_training_inputs(x.to(dev), gen, corruptions=["gaussian_noise", "fog"])
    assert xa.device.type == "cuda" and xa.shape == (6 * x.shape[0], 3, 32, 32)
