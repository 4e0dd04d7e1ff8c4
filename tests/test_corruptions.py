"""The CIFAR-C corruption benchmark: registry, per-op behaviour, numerics against the libraries the
reference generator calls (scipy, Pillow, libjpeg), and the release's file layout."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_digits

from ltta.corruptions import (
    ALL_CORRUPTIONS,
    BENCHMARK,
    CORRUPTIONS,
    EXTRA,
    FAMILIES,
    TABLES,
    available_corruptions,
    corrupt,
    corrupt_images,
    derive_seed,
    read_corruption,
    write_corruption_set,
)
from ltta.corruptions import _ops, blur, digital, extra, weather
from ltta.corruptions import severity as sev

RANDOM = {
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
    "snow", "frost", "fog", "elastic_transform", "spatter",
}  # fmt: skip
# The reference's tables are not monotone for these (elastic's s1 has the largest affine jitter,
# saturate s1/s2 desaturate and s3-5 oversaturate, spatter switches from water to mud at s4).
NOT_MONOTONE = {"elastic_transform", "saturate", "spatter"}
# Mean change strictly increasing over all five levels on the test batch.
STRICTLY_MONOTONE = {
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "zoom_blur", "snow",
    "fog", "brightness", "contrast", "jpeg_compression", "gaussian_blur",
}  # fmt: skip


def _batch() -> np.ndarray:
    """8 real-ish uint8 images [8,32,32,3]: 4 coloured digits (sklearn), 2 smooth, 2 textured."""
    d = load_digits().images[:4] / 16.0
    big = np.kron(d, np.ones((4, 4)))
    cols = np.array([[1, 0.3, 0.2], [0.2, 0.8, 0.4], [0.3, 0.4, 1], [0.9, 0.9, 0.2]])
    digits = 0.15 + 0.8 * big[..., None] * cols[:, None, None, :]
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    smooth = np.stack(
        [
            np.stack([xx, yy, 1 - xx], -1),
            np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), xx * yy], -1),
        ]
    )
    rng = np.random.default_rng(0)
    checker = ((np.indices((32, 32)).sum(0) // 4) % 2)[..., None] * np.array([0.8, 0.6, 0.3]) + 0.1
    texture = np.stack([checker, rng.uniform(0.2, 0.8, (32, 32, 3))])
    return np.round(np.concatenate([digits, smooth, texture]) * 255).astype(np.uint8)


IMAGES = _batch()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 255.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- registry and tables


def test_registry_holds_the_19_release_names_in_order() -> None:
    assert len(BENCHMARK) == 15 and len(EXTRA) == 4
    assert set(CORRUPTIONS.names()) == set(ALL_CORRUPTIONS) == set(TABLES)
    assert BENCHMARK[0] == "gaussian_noise" and BENCHMARK[-1] == "jpeg_compression"
    assert EXTRA == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert sorted(n for f in FAMILIES.values() for n in f) == sorted(ALL_CORRUPTIONS)
    assert all(len(t) == 5 for t in TABLES.values())


def test_severity_tables_pin_the_cifar_values() -> None:
    assert sev.GAUSSIAN_NOISE == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert sev.MOTION_BLUR[4] == (9, 2.5) and sev.JPEG_QUALITY == (80, 65, 58, 50, 40)
    # np.arange's float stop: 1.06 and 1.11 slip into levels 1 and 2, the other stops do not
    assert [len(z) for z in sev.ZOOM_BLUR] == [7, 12, 16, 21, 26]
    assert sev.ELASTIC[1] == pytest.approx((1.6, 6.4, 2.24))
    assert sev.SNOW[4] == (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
        sev.check_severity(6)


# ---------------------------------------------------------------- every op


def test_an_empty_batch_comes_back_empty(x: torch.Tensor) -> None:
    """corrupt() on zero images returns zero images for every corruption (some ops need one image)."""
    empty = x[:0]
    for name in ALL_CORRUPTIONS:
        out = corrupt(empty, name, 5, _gen(0))
        assert out.shape == empty.shape and out.dtype == empty.dtype, name
    with pytest.raises(ValueError):
        corrupt(empty, "fog", 6, _gen(0))  # the severity is still checked


@pytest.mark.parametrize("name", ["elastic_transform", "spatter", "brightness"])
def test_cpu_batches_run_in_chunks_from_one_generator(name: str, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU corrupt() runs cache-sized chunks in order from one generator: the output is the
    per-chunk calls concatenated, and a batch of one chunk is one plain call."""
    from ltta.corruptions import apply

    monkeypatch.setattr(apply, "CPU_CHUNK", 3)
    fn, batch = CORRUPTIONS.get(name), x[:8]
    gen = _gen(5)
    expected = torch.cat([fn(batch[i : i + 3], 4, gen) for i in range(0, 8, 3)])
    assert torch.equal(corrupt(batch, name, 4, _gen(5)), expected)
    assert torch.equal(corrupt(batch[:3], name, 4, _gen(5)), fn(batch[:3], 4, _gen(5)))
    if name == "elastic_transform":  # its three draws interleave, so one whole-batch call differs
        assert not torch.equal(expected, fn(batch, 4, _gen(5)))


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_op_contract_and_determinism(name: str, x: torch.Tensor) -> None:
    fn = CORRUPTIONS.get(name)
    for s in (1, 5):
        y = fn(x, s, _gen(3))
        assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
        assert not torch.isnan(y).any() and y.min() >= 0 and y.max() <= 1
        assert torch.equal(y, fn(x, s, _gen(3))), "same seed must give the same output"
        if name in RANDOM:
            assert not torch.equal(y, fn(x, s, _gen(4))), "a different seed must change a random corruption"
    assert not torch.equal(fn(x, 5, _gen(3)), x)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_strength_grows_with_severity(name: str) -> None:
    diffs = [np.abs(corrupt_images(IMAGES, name, s, seed=1).astype(float) - IMAGES).mean() for s in sev.SEVERITIES]
    assert diffs[4] > 0.5, diffs
    if name in STRICTLY_MONOTONE:
        assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs
    elif name not in NOT_MONOTONE:
        assert diffs[0] < diffs[4], diffs


# ---------------------------------------------------------------- numerics against the libraries


@pytest.mark.parametrize("s", [1, 5])
def test_gaussian_blur_matches_scipy(s: int, x: torch.Tensor) -> None:
    c = sev.GAUSSIAN_BLUR[s - 1]
    ref = ndimage.gaussian_filter(IMAGES / 255.0, sigma=(0, c, c, 0), mode="nearest", truncate=4.0)
    ours = CORRUPTIONS.get("gaussian_blur")(x, s, _gen()).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(ours, np.clip(ref, 0, 1), atol=1e-6)


def _clipped_zoom_scipy(img: np.ndarray, z: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    out = ndimage.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
    t = (out.shape[0] - h) // 2
    return out[t : t + h, t : t + h]


def test_zoom_blur_matches_scipy_zoom(x: torch.Tensor) -> None:
    s = 4
    ours = CORRUPTIONS.get("zoom_blur")(x[:3], s, _gen()).permute(0, 2, 3, 1).numpy()
    for i in range(3):
        xi = (IMAGES[i] / 255.0).astype(np.float32)
        acc = sum(_clipped_zoom_scipy(xi, z) for z in np.arange(1, 1.21, 0.01))
        ref = np.clip((xi + acc) / (len(sev.ZOOM_BLUR[s - 1]) + 1), 0, 1)
        np.testing.assert_allclose(ours[i], ref, atol=1e-6)


def test_pixelate_is_bit_exact_with_pillow_box(x: torch.Tensor) -> None:
    for s in sev.SEVERITIES:
        c = sev.PIXELATE[s - 1]
        ours = corrupt_images(IMAGES, "pixelate", s, seed=0)
        for i in range(len(IMAGES)):
            small = Image.fromarray(IMAGES[i]).resize((int(32 * c), int(32 * c)), Image.BOX)
            np.testing.assert_array_equal(ours[i], np.asarray(small.resize((32, 32), Image.BOX)))


@pytest.mark.parametrize("s", [1, 5])
def test_jpeg_is_bit_exact_with_pillow(s: int) -> None:
    ours = corrupt_images(IMAGES, "jpeg_compression", s, seed=0)
    for i in range(len(IMAGES)):
        buf = io.BytesIO()
        Image.fromarray(IMAGES[i]).save(buf, "JPEG", quality=sev.JPEG_QUALITY[s - 1])
        np.testing.assert_array_equal(ours[i], np.asarray(Image.open(buf)))


def test_elastic_displacement_matches_scipy_map_coordinates(x: torch.Tensor) -> None:
    s = 2
    alpha, sigma, _ = sev.ELASTIC[s - 1]
    g = _gen(5)
    ux = torch.rand(4, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    uy = torch.rand(4, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    no_affine = torch.zeros(4, 3, 2, dtype=torch.float64)
    ours = digital.elastic_from_draws(x[:4], s, no_affine, ux, uy).permute(0, 2, 3, 1).numpy()
    yy, xx, zz = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    for i in range(4):
        dx = (ndimage.gaussian_filter(ux[i].numpy(), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        dy = (ndimage.gaussian_filter(uy[i].numpy(), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        coords = [(yy + dy[..., None]).ravel(), (xx + dx[..., None]).ravel(), zz.ravel()]
        img = IMAGES[i].astype(np.float32) / 255.0
        ref = ndimage.map_coordinates(img, coords, order=1, mode="reflect").reshape(img.shape)
        np.testing.assert_allclose(ours[i], np.clip(ref, 0, 1), atol=1e-6)


def test_warp_affine_translation_uses_reflect101_and_32nd_pixels() -> None:
    img = torch.arange(16.0).view(1, 1, 4, 4)
    shift_right = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)  # dst(x) = src(x - 1)
    out = digital.warp_affine_cv(img, shift_right)[0, 0]
    assert out[:, 0].tolist() == [1.0, 5.0, 9.0, 13.0]  # BORDER_REFLECT_101: src(-1) = src(1)
    assert torch.equal(out[:, 1:], img[0, 0, :, :3])
    half = torch.tensor([[[1.0, 0.0, 0.3], [0.0, 1.0, 0.0]]], dtype=torch.float64)  # 0.3 px -> 10/32 px
    out = digital.warp_affine_cv(img, half)[0, 0]
    assert out[0, 2].item() == pytest.approx(2 - 10 / 32)


def test_glass_shuffle_equals_the_sequential_reference_loop() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    d = 1
    dy = rng.integers(-d, d, (30, 30))
    dx = rng.integers(-d, d, (30, 30))
    seq = img.copy()
    for h in range(32 - d, d, -1):  # the reference's visiting order and its view-based "swap"
        for w in range(32 - d, d, -1):
            hp, wp = h + dy[h - d - 1, w - d - 1], w + dx[h - d - 1, w - d - 1]
            seq[h, w], seq[hp, wp] = seq[hp, wp], seq[h, w]
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    ours = blur.glass_shuffle(t, torch.from_numpy(dy)[None], torch.from_numpy(dx)[None], d)
    np.testing.assert_array_equal(ours[0].permute(1, 2, 0).numpy().astype(np.uint8), seq)


def test_motion_blur_kernel_is_imagemagicks_half_gaussian() -> None:
    img = torch.zeros(2, 3, 32, 32)
    img[:, :, 16, 16] = 255.0
    out = _ops.motion_blur_levels(img, 6, 1.0, torch.tensor([0.0, 90.0], dtype=torch.float64))
    k = np.exp(-np.arange(13) ** 2 / 2.0)
    expected = np.round(255 * k / k.sum())
    # angle 0: pixel (y, x) averages (y, x + i), so the impulse spreads to the left
    np.testing.assert_array_equal(out[0, 0, 16, 16 - 12 : 17].flip(0).numpy(), expected)
    assert out[0, 0, 15].sum() == 0 and out[0, 0, 16, 17:].sum() == 0
    # angle 90: offsets (0, i) downwards, the impulse spreads upwards
    np.testing.assert_array_equal(out[1, 0, 16 - 12 : 17, 16].flip(0).numpy(), expected)


def test_hsv_matches_colorsys_without_ties() -> None:
    p = torch.rand(1, 3, 6, 6, generator=_gen(1))
    hsv = _ops.rgb2hsv(p)
    ref = np.array([[colorsys.rgb_to_hsv(*p[0, :, i, j].tolist()) for j in range(6)] for i in range(6)])
    np.testing.assert_allclose(hsv[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    torch.testing.assert_close(_ops.hsv2rgb(hsv), p, atol=1e-6, rtol=0)
    gray = torch.full((1, 3, 1, 1), 0.4)
    assert _ops.rgb2hsv(gray).flatten().tolist() == pytest.approx([0.0, 0.0, 0.4])


def test_defocus_disk_kernel() -> None:
    k = blur.disk_kernel(0.3, 0.4)
    assert k.shape == (17, 17) and k.dtype == np.float32 and k.sum() == pytest.approx(1.0, abs=1e-6)
    e = np.exp(-1 / (2 * 0.4**2))
    assert k[8, 8] == pytest.approx((1 / (1 + 2 * e)) ** 2, rel=1e-6)  # a point blurred by the 3x3 Gaussian
    assert blur.disk_kernel(1.5, 0.1)[7:10, 7:10].min() > 0.1  # radius 1.5 covers the 3x3 block


def _plasma_loop(mapsize: int, decay: float, g: torch.Generator) -> np.ndarray:
    """The reference's single-map diamond-square, with its U(-w, w) draws taken from ``g``."""
    m = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wmean(a: np.ndarray) -> np.ndarray:
        u = torch.rand((1, *a.shape), generator=g, dtype=torch.float64)[0].numpy() * 2 * wibble - wibble
        return a / 4 + wibble * u

    while step >= 2:
        h = step // 2
        c = m[0::step, 0::step]
        sq = c + np.roll(c, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        m[h::step, h::step] = wmean(sq)
        dr, ul = m[h::step, h::step], m[0::step, 0::step]
        m[0::step, h::step] = wmean(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        m[h::step, 0::step] = wmean(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


def test_plasma_fractal_matches_the_reference_recurrence() -> None:
    ours = weather.plasma_fractal(1, 32, 1.75, _gen(0), torch.device("cpu"))[0].numpy()
    np.testing.assert_allclose(ours, _plasma_loop(32, 1.75, _gen(0)), atol=1e-12)
    m = weather.plasma_fractal(3, 32, 2.0, _gen(0), torch.device("cpu"))
    assert m.amin().item() == 0.0 and (m.amax(dim=(1, 2)) == 1.0).all() and not torch.equal(m[0], m[1])


def test_frost_pictures_are_the_scaled_reference_files() -> None:
    sizes = [p.shape for p in weather.frost_pictures()]
    # the originals' sizes x 0.2 (frost1 900x600, frost2/3 560x315, frost4 527x350, frost5 660x495)
    assert sizes == [(120, 180, 3), (63, 112, 3), (63, 112, 3), (70, 105, 3), (99, 132, 3)]
    crops = weather.frost_crops(64, 32, 32, _gen(0), torch.device("cpu"))
    assert crops.shape == (64, 3, 32, 32) and crops.max() > 200


def test_opencv_steps_of_spatter() -> None:
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 255
    edges = extra.canny(step, 50, 150)[0, 0]
    assert edges[:, 3].all() and edges.sum() == 8  # non-max suppression keeps the left column only
    nonzero = torch.ones(1, 1, 5, 7, dtype=torch.bool)
    nonzero[0, 0, 2, 3] = False
    dist = extra.distance_transform_l2_5(nonzero)[0, 0]
    assert dist[2, 4].item() == pytest.approx(1.0) and dist[1, 4].item() == pytest.approx(1.4, abs=1e-4)
    assert dist[0, 4].item() == pytest.approx(2.1969, abs=1e-4) and dist[2, 0].item() == pytest.approx(3.0)
    # no zero pixel: OpenCV 3.4's passes leave INIT_DIST0 (2**29 - 1) plus one or two steps
    far = extra.distance_transform_l2_5(torch.ones(1, 1, 3, 3, dtype=torch.bool))[0, 0]
    assert far[1, 1].item() == 8194.0 and far.min().item() == 8193.0
    eq = extra.equalize_hist(torch.tensor([0.0, 0, 1, 2]).view(1, 1, 2, 2))
    assert eq.flatten().tolist() == [0.0, 0.0, 128.0, 255.0]  # 127.5 rounds half to even


# ---------------------------------------------------------------- fast forms against direct ones
# The ops use matrix, separable, padded and raster-scan forms for speed; each is pinned here to
# the direct computation it replaces (a gather through border_index, a 2-D convolution,
# shortest chamfer paths by relaxation).

BORDER_MODES = ("nearest", "mirror", "reflect", "wrap")


@pytest.mark.parametrize("mode", BORDER_MODES)
def test_pad2d_fast_path_equals_the_border_index_gather(mode: str) -> None:
    img = torch.rand(2, 3, 7, 9, generator=_gen(0), dtype=torch.float64)
    for ph, pw in ((1, 2), (6, 8), (7, 9), (15, 20)):  # within one reflection, and beyond it
        rows = _ops.border_index(torch.arange(-ph, 7 + ph), 7, mode)
        cols = _ops.border_index(torch.arange(-pw, 9 + pw), 9, mode)
        assert torch.equal(_ops.pad2d(img, ph, pw, mode), img[..., rows, :][..., cols]), (mode, ph, pw)


def _correlate_direct(img: torch.Tensor, kernel: np.ndarray, mode: str) -> torch.Tensor:
    """2-D correlation of every plane with ``kernel`` (odd, centred) after a border_index pad."""
    r = kernel.shape[0] // 2
    n, c, h, w = img.shape
    rows = _ops.border_index(torch.arange(-r, h + r), h, mode)
    cols = _ops.border_index(torch.arange(-r, w + r), w, mode)
    padded = img.reshape(n * c, 1, h, w)[..., rows, :][..., cols]
    k = torch.as_tensor(kernel, dtype=img.dtype).view(1, 1, *kernel.shape)
    return torch.nn.functional.conv2d(padded, k).reshape(n, c, h, w)


@pytest.mark.parametrize("mode", BORDER_MODES)
def test_separable_matrix_filter_equals_direct_correlation(mode: str, x: torch.Tensor) -> None:
    for sigma in (0.4, 1.0, 6.4):  # radius 2, 4 and (truncate 3) 19: several border folds
        k = _ops.gaussian_kernel1d(sigma, truncate=3.0)
        ours = _ops.separable_filter(x.double(), k, k, mode)
        torch.testing.assert_close(ours, _correlate_direct(x.double(), np.outer(k, k), mode), atol=1e-12, rtol=0)
    ours32 = _ops.gaussian_filter(x, 0.7, mode=mode)
    k = _ops.gaussian_kernel1d(0.7)
    torch.testing.assert_close(ours32, _correlate_direct(x, np.outer(k, k), mode), atol=1e-6, rtol=0)


@pytest.mark.parametrize("s", sev.SEVERITIES)
def test_defocus_separable_terms_equal_the_2d_filter(s: int, x: torch.Tensor) -> None:
    kernel = blur.disk_kernel(*sev.DEFOCUS_BLUR[s - 1])
    terms = _ops.separable_terms(tuple(tuple(float(v) for v in row) for row in kernel))
    assert len(terms) == (2 if s == 4 else 1)  # a point / 3x3 square: rank 1; the radius-1 cross: 2
    ref = _correlate_direct(x.double(), kernel.astype(np.float64), "mirror").clamp(0, 1)
    torch.testing.assert_close(CORRUPTIONS.get("defocus_blur")(x, s, _gen()).double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_ops.filter2d(x.double(), kernel), _correlate_direct(x.double(), kernel, "mirror"), atol=1e-12, rtol=0)


def test_bilinear_sample_padding_equals_per_neighbour_borders() -> None:
    img = torch.rand(3, 2, 8, 8, generator=_gen(1), dtype=torch.float64)
    ys = torch.rand(3, 8, 8, generator=_gen(2), dtype=torch.float64) * 30 - 11  # well past both borders
    xs = torch.rand(3, 8, 8, generator=_gen(3), dtype=torch.float64) * 30 - 11
    for mode in ("nearest", "mirror", "reflect"):
        y0, x0 = torch.floor(ys).long(), torch.floor(xs).long()
        fy, fx = (ys - y0).unsqueeze(1), (xs - x0).unsqueeze(1)

        def at(r: torch.Tensor, c: torch.Tensor, mode: str = mode) -> torch.Tensor:
            return _ops.gather_pixels(img, _ops.border_index(r, 8, mode), _ops.border_index(c, 8, mode))

        ref = (at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy) + (at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx) * fy
        assert torch.equal(_ops.bilinear_sample(img, ys, xs, mode), ref), mode
        # a float32 image in float64 arithmetic: the same as widening it first
        f32 = img.float()
        assert torch.equal(_ops.bilinear_sample(f32, ys, xs, mode, dtype=torch.float64), _ops.bilinear_sample(f32.double(), ys, xs, mode))


def _chamfer_relaxation(nonzero: torch.Tensor) -> torch.Tensor:
    """Shortest paths under the 5x5 chamfer steps inside the image, by relaxation until stable."""
    hv, diag, knight = extra._CHAMFER5
    inf = 1 << 40
    d = torch.where(nonzero, inf, 0).to(torch.int64)
    steps = [(0, 1, hv), (0, -1, hv), (1, 0, hv), (-1, 0, hv), (1, 1, diag), (1, -1, diag), (-1, 1, diag), (-1, -1, diag)]
    steps += [(a, b, knight) for a, b in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))]
    h, w = d.shape[-2:]
    while True:
        p = torch.nn.functional.pad(d, (2, 2, 2, 2), value=inf)
        best = d
        for dy, dx, wgt in steps:
            best = torch.minimum(best, p[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w] + wgt)
        if torch.equal(best, d):
            return (d.to(torch.float64) / 65536).to(torch.float32)
        d = best


def test_distance_transform_raster_passes_equal_shortest_chamfer_paths() -> None:
    g = _gen(4)
    for p, (h, w) in ((0.05, (32, 32)), (0.5, (32, 32)), (0.97, (32, 32)), (0.9, (13, 29))):
        nz = torch.rand(64, 1, h, w, generator=g) < p
        nz[:, 0, h // 2, w // 3] = False  # at least one zero pixel per image
        assert torch.equal(extra.distance_transform_l2_5(nz), _chamfer_relaxation(nz)), p


# ---------------------------------------------------------------- uint8 API and file layout


def test_corrupt_images_truncates_like_the_reference(x: torch.Tensor) -> None:
    out = corrupt_images(IMAGES, "contrast", 3, seed=0)
    y = corrupt(x, "contrast", 3, _gen())
    assert out.dtype == np.uint8 and out.shape == IMAGES.shape
    np.testing.assert_array_equal(out, np.floor(y.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    assert (corrupt_images(flat, "pixelate", 5, seed=0) == 77).all()  # exact levels survive truncation
    a = corrupt_images(IMAGES, "shot_noise", 2, seed=9)
    assert np.array_equal(a, corrupt_images(IMAGES, "shot_noise", 2, seed=9))
    assert not np.array_equal(a, corrupt_images(IMAGES, "shot_noise", 2, seed=10))


def test_corrupt_images_errors() -> None:
    with pytest.raises(KeyError, match="unknown corruption 'rain'"):
        corrupt_images(IMAGES, "rain", 1, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt_images(IMAGES, "fog", 0, seed=0)
    with pytest.raises(ValueError, match=r"\[N,32,32,3\]"):
        corrupt_images(np.zeros((2, 28, 28, 3), np.uint8), "fog", 1, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt_images(IMAGES.astype(np.float32), "fog", 1, seed=0)


def test_write_read_round_trip(tmp_path: Path) -> None:
    imgs, labels = IMAGES[:4], np.array([3, 1, 4, 1])
    names = ["gaussian_noise", "frost"]
    write_corruption_set(tmp_path, imgs, labels, names, seed=7, progress=False)
    assert available_corruptions(tmp_path) == names
    full = np.load(tmp_path / "frost.npy")
    assert full.shape == (20, 32, 32, 3) and full.dtype == np.uint8
    stored = np.load(tmp_path / "labels.npy")
    assert stored.dtype == np.uint8 and stored.tolist() == labels.tolist() * 5
    for s in (1, 3, 5):
        got, lab = read_corruption(tmp_path, "frost", s)
        expect = corrupt_images(imgs, "frost", s, seed=derive_seed(7, "frost", s))
        np.testing.assert_array_equal(got, expect)
        np.testing.assert_array_equal(got, full[(s - 1) * 4 : s * 4])
        assert lab.dtype == np.int64 and lab.tolist() == labels.tolist()
    all_rows, all_labels = read_corruption(tmp_path, "gaussian_noise")
    assert all_rows.shape == (20, 32, 32, 3) and len(all_labels) == 20
    # a cell's output does not depend on the other names written with it
    other = tmp_path / "alone"
    write_corruption_set(other, imgs, labels, ["frost"], seed=7, progress=False)
    np.testing.assert_array_equal(np.load(other / "frost.npy"), full)
    write_corruption_set(other, imgs, np.array([300, 1, 2, 3]), ["fog"], seed=7, progress=False)
    assert np.load(other / "labels.npy").dtype == np.int64


def test_reader_on_an_official_style_file(tmp_path: Path) -> None:
    n = 3
    imgs = np.repeat(np.arange(5, dtype=np.uint8), n)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    np.save(tmp_path / "snow.npy", imgs)
    np.save(tmp_path / "labels.npy", np.tile(np.array([9, 0, 2], np.uint8), 5))
    got, lab = read_corruption(tmp_path, "snow", 2)
    assert got.shape == (3, 32, 32, 3) and (got == 1).all() and lab.tolist() == [9, 0, 2]


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fog.npy does not exist"):
        read_corruption(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(FileNotFoundError, match="labels.npy does not exist"):
        read_corruption(tmp_path, "fog", 1)
    np.save(tmp_path / "labels.npy", np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match=r"must hold uint8 \[5N,H,W,3\]"):
        read_corruption(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((12, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="not a multiple of 5"):
        read_corruption(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((15, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="same generation run"):
        read_corruption(tmp_path, "fog", 1)
    np.save(tmp_path / "labels.npy", np.zeros(15, np.uint8))
    with pytest.raises(ValueError, match="severity"):
        read_corruption(tmp_path, "fog", 7)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cuda_matches_cpu(name: str, x: torch.Tensor) -> None:
    xc = x.cuda()
    y = CORRUPTIONS.get(name)(xc, 3, torch.Generator(device="cuda").manual_seed(0))
    assert y.device.type == "cuda" and y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    if name not in RANDOM:
        torch.testing.assert_close(y.cpu(), CORRUPTIONS.get(name)(x, 3, _gen()), atol=2e-6, rtol=0)


# ---------------------------------------------------------------- against OpenCV / scikit-image
# These run where opencv-python and scikit-image are installed (not project dependencies): they
# replay the reference generator's library calls on the same inputs and compare.


@pytest.mark.reference
def test_reference_opencv_steps() -> None:
    cv2 = pytest.importorskip("cv2")
    cv_version = tuple(int(p) for p in cv2.__version__.split(".")[:2])
    rng = np.random.default_rng(1)
    # warpAffine (elastic's affine step), float32 image, BORDER_REFLECT_101
    img = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
    pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
    for _ in range(5):
        mat = cv2.getAffineTransform(pts1, pts1 + rng.uniform(-2.56, 2.56, (3, 2)).astype(np.float32))
        ref = cv2.warpAffine(img, mat, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        t = torch.from_numpy(img).permute(2, 0, 1)[None]
        ours = digital.warp_affine_cv(t, torch.from_numpy(mat)[None]).permute(0, 2, 3, 1)[0].numpy()
        if cv_version < (4, 11):  # the fixed-point remap of OpenCV 3.4 (the reference pins 3.4.2)
            np.testing.assert_allclose(ours, ref, atol=1e-5)
        else:
            # OpenCV 4.11 rewrote warpAffine with float coordinates: check the inverse map and the
            # borders against it without the 1/32-pixel grid, and that the grid moves values little
            inv = digital._affine_inverse(torch.from_numpy(mat)[None])[0]
            gy, gx = torch.meshgrid(torch.arange(32.0, dtype=torch.float64), torch.arange(32.0, dtype=torch.float64), indexing="ij")
            sx = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
            sy = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
            exact = _ops.bilinear_sample(t.double(), sy[None], sx[None], "mirror").permute(0, 2, 3, 1)[0].numpy()
            np.testing.assert_allclose(exact, ref, atol=1e-5)
            assert np.abs(ours - ref).max() < 0.03
    # defocus: the disk kernel and filter2D
    for radius, alias in sev.DEFOCUS_BLUR:
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
        kernel = cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias)
        np.testing.assert_allclose(blur.disk_kernel(radius, alias), kernel, atol=1e-7)
        chan = IMAGES[0, :, :, 0] / 255.0
        ref = cv2.filter2D(chan, -1, kernel)
        ours = _ops.filter2d(torch.from_numpy(chan)[None, None], kernel)[0, 0].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    # spatter's liquid branch, step by step
    for seed in range(6):
        layer = ndimage.gaussian_filter(np.random.default_rng(seed).normal(0.65, 0.3, (32, 32)), 1.0, mode="nearest")
        layer[layer < 0.69] = 0
        lu8 = (layer * 255).astype(np.uint8)
        canny = cv2.Canny(lu8, 50, 150)
        ours_edges = extra.canny(torch.from_numpy(lu8.astype(np.float32))[None, None], 50, 150)[0, 0].numpy()
        np.testing.assert_array_equal(ours_edges, canny > 0)
        dist = cv2.distanceTransform(255 - canny, cv2.DIST_L2, 5)
        ours_dist = extra.distance_transform_l2_5(torch.from_numpy(canny == 0)[None, None])[0, 0].numpy()
        np.testing.assert_allclose(np.minimum(ours_dist, 8192), np.minimum(dist, 8192), atol=1e-4)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32))
        m = lu8 * cv2.blur(dist, (3, 3)).astype(np.float32)
        m = m / m.max() * 0.5
        ours_m = extra.liquid_mask(torch.from_numpy(layer)[None, None], 0.5)[0, 0].numpy()
        np.testing.assert_allclose(ours_m, m, atol=1e-6)
    hist_in = rng.integers(3, 40, (1, 1, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(
        extra.equalize_hist(torch.from_numpy(hist_in))[0, 0].numpy(), cv2.equalizeHist(hist_in[0, 0].astype(np.uint8))
    )


@pytest.mark.reference
def test_reference_skimage_steps(x: torch.Tensor) -> None:
    skimage = pytest.importorskip("skimage")
    from skimage.filters import gaussian

    rgb = IMAGES / 255.0  # uint8 levels have many ties between channels
    for name, table in (("brightness", sev.BRIGHTNESS), ("saturate", sev.SATURATE)):
        for s in (1, 5):
            hsv = skimage.color.rgb2hsv(rgb)
            if name == "brightness":
                hsv[..., 2] = np.clip(hsv[..., 2] + table[s - 1], 0, 1)
            else:
                a, b = table[s - 1]
                hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
            ref = np.clip(skimage.color.hsv2rgb(hsv), 0, 1)
            ours = CORRUPTIONS.get(name)(x, s, _gen()).permute(0, 2, 3, 1).double().numpy()
            np.testing.assert_allclose(ours, ref, atol=2e-6)
    ours = _ops.gaussian_filter(x.double(), 0.7).permute(0, 2, 3, 1).numpy()
    for i in range(len(rgb)):  # skimage defaults: mode 'nearest', truncate 4
        np.testing.assert_allclose(ours[i], gaussian(rgb[i], sigma=0.7, channel_axis=-1), atol=1e-12)


@pytest.mark.reference
def test_reference_frost_files_match_runtime_resize() -> None:
    """Set LTTA_ROBUSTNESS_CREATE_C to hendrycks/robustness ImageNet-C/create_c to compare the
    shipped 0.2-scale pictures with cv2.imread + cv2.resize(fx=fy=0.2) of the originals."""
    import os

    cv2 = pytest.importorskip("cv2")
    folder = os.environ.get("LTTA_ROBUSTNESS_CREATE_C")
    if not folder:
        pytest.skip("LTTA_ROBUSTNESS_CREATE_C not set")
    originals = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
    for shipped, name in zip(weather.frost_pictures(), originals):
        ref = cv2.resize(cv2.imread(str(Path(folder) / name)), (0, 0), fx=0.2, fy=0.2)[..., ::-1]
        np.testing.assert_array_equal(shipped, ref)
