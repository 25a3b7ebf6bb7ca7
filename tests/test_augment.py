"""Augmentation policies (medical2d, medical3d), CutMix boxes and the batched mixing ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.augment.mixing import bcp_mask, copy_paste, cutmix, cutmix_target
from semiseg.augment.policies2d import Medical2D, sample_cutmix_box
from semiseg.augment.policies3d import Medical3D, bias_field, num_bias_coefficients
from semiseg.errors import ConfigError

P2 = (32, 24)
P3 = (16, 16, 12)


def blocks(shape: tuple[int, ...], rng: np.random.Generator, classes: int = 4) -> np.ndarray:
    """A label map of random constant blocks (so nearest-neighbour ops keep it meaningful)."""
    coarse = rng.integers(0, classes, size=tuple(max(s // 4, 1) for s in shape))
    lab = coarse
    for ax, s in enumerate(shape):
        lab = np.repeat(lab, math.ceil(s / coarse.shape[ax]), axis=ax)
    return np.ascontiguousarray(lab[tuple(slice(0, s) for s in shape)]).astype(np.int64)


@pytest.fixture(scope="module")
def pol2() -> Medical2D:
    return Medical2D(patch_size=P2)


@pytest.fixture(scope="module")
def pol3() -> Medical3D:
    return Medical3D(patch_size=P3)


def rngs(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- registration --------------------------------------------------------------------------------
def test_registered_with_explicit_options():
    from semiseg.registry import POLICIES, accepted_kwargs

    # The table itself: looking a name up would import every built-in package.
    assert POLICIES._table["medical2d"] is Medical2D
    assert POLICIES._table["medical3d"] is Medical3D
    assert accepted_kwargs(Medical2D) == ({"patch_size", "quantize", "cutmix_p", "jitter_p", "blur_p"}, False)
    assert accepted_kwargs(Medical3D) == ({"patch_size", "cutmix_p", "bias_p", "blur_p", "foreground"}, False)


def test_foreground_share_centres_patches_on_the_organ():
    # a 4-voxel organ in a 40x40x24 volume: uniform 8x8x8 crops almost never see it, foreground=1 always does
    image = np.zeros((1, 40, 40, 24), np.float32)
    label = np.zeros((40, 40, 24), np.int64)
    label[30:32, 5:7, 20] = 1
    image[0][label == 1] = 7.0
    seen = {}
    for share in (0.0, 1.0):
        pol = Medical3D(patch_size=(8, 8, 8), foreground=share)
        hits = [pol.weak(image, label, rngs(i))[1].any() for i in range(40)]
        seen[share] = sum(hits)
    assert seen[1.0] == 40 and seen[0.0] < 10
    pol = Medical3D(patch_size=(8, 8, 8), foreground=1.0)
    img, lab = pol.weak(image, label, rngs(3))
    assert img.shape == (1, 8, 8, 8) and lab.shape == (8, 8, 8)
    np.testing.assert_array_equal(img[0] == 7.0, lab == 1)  # image and label cropped together
    # the share draws nothing when it is 0, so the official LA pipeline keeps its random stream
    a = Medical3D(patch_size=(8, 8, 8)).weak(image, label, rngs(5))
    b = Medical3D(patch_size=(8, 8, 8), foreground=0.0).weak(image, label, rngs(5))
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ConfigError, match="share of labeled patches"):
        Medical3D(patch_size=(8, 8, 8), foreground=1.5)


# -- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(20, 15), (32, 24), (70, 41)])
def test_medical2d_output_is_patch(pol2, spatial):
    rng = rngs(0)
    img = rng.random((2, *spatial), dtype=np.float32)
    lab = blocks(spatial, rng)
    for seed in range(6):
        w, y = pol2.weak(img, lab, rngs(seed))
        assert w.shape == (2, *P2) and w.dtype == np.float32
        assert y.shape == P2 and y.dtype == np.int64
        u = pol2.weak_unlabeled(img, rngs(seed))
        assert u.shape == (2, *P2) and u.dtype == np.float32
        s = pol2.strong(u, rngs(seed))
        assert s.shape == (2, *P2) and s.dtype == np.float32
        assert pol2.cutmix_box(rngs(seed)).shape == P2


@pytest.mark.parametrize("spatial", [(10, 30, 9), (16, 16, 12), (23, 19, 30)])
def test_medical3d_output_is_patch(pol3, spatial):
    rng = rngs(1)
    img = rng.standard_normal((1, *spatial)).astype(np.float32)
    lab = blocks(spatial, rng, classes=2)
    for seed in range(6):
        w, y = pol3.weak(img, lab, rngs(seed))
        assert w.shape == (1, *P3) and w.dtype == np.float32
        assert y.shape == P3 and y.dtype == np.int64
        u = pol3.weak_unlabeled(img, rngs(seed))
        assert u.shape == (1, *P3)
        s = pol3.strong(u, rngs(seed))
        assert s.shape == (1, *P3) and s.dtype == np.float32
        assert pol3.cutmix_box(rngs(seed)).shape == P3


def test_bad_patch_size():
    from semiseg.errors import ConfigError

    with pytest.raises(ConfigError):
        Medical2D(patch_size=(8, 8, 8))
    with pytest.raises(ConfigError):
        Medical3D(patch_size=(8, 8))


# -- weak keeps image and label aligned ----------------------------------------------------------
@pytest.mark.parametrize("spatial", [(20, 15), (45, 50)])
def test_medical2d_weak_alignment(pol2, spatial):
    rng = rngs(2)
    lab = blocks(spatial, rng)
    img = np.stack([lab * 0.25, lab * 0.5]).astype(np.float32)
    for seed in range(30):  # enough seeds to visit the rot-flip, rotate and identity branches
        w, y = pol2.weak(img, lab, rngs(seed))
        assert np.array_equal(w[0], y * np.float32(0.25))
        assert np.array_equal(w[1], y * np.float32(0.5))
        assert set(np.unique(y)) <= {0, 1, 2, 3}


def test_medical2d_unlabeled_matches_weak_geometry():
    rng = rngs(3)
    img = rng.random((1, 40, 30), dtype=np.float32)
    lab = blocks((40, 30), rng)
    plain, quant = Medical2D(patch_size=P2, quantize=False), Medical2D(patch_size=P2, quantize=True)
    for seed in range(10):
        w, _ = plain.weak(img, lab, rngs(seed))
        assert np.array_equal(plain.weak_unlabeled(img, rngs(seed)), w)
        q = quant.weak_unlabeled(img, rngs(seed))
        # The reference casts (x * 255) to uint8, i.e. floors, then divides by 255.
        assert np.array_equal(q, np.floor(w * 255).astype(np.uint8).astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("spatial", [(10, 30, 9), (25, 21, 18)])
def test_medical3d_weak_alignment(pol3, spatial):
    rng = rngs(4)
    lab = blocks(spatial, rng, classes=3)
    img = (lab[None] * np.float32(1.5)).astype(np.float32)
    for seed in range(12):
        w, y = pol3.weak(img, lab, rngs(seed))
        assert np.array_equal(w[0], y * np.float32(1.5))
        assert np.array_equal(pol3.weak_unlabeled(img, rngs(seed)), w)


def test_medical3d_pad_rule():
    # A volume equal to the patch gets the reference's 3-voxel zero padding, so crops can contain padding.
    pol = Medical3D(patch_size=(8, 8, 8))
    img = np.ones((1, 8, 8, 8), dtype=np.float32)
    zeros = [(pol.weak_unlabeled(img, rngs(s)) == 0).any() for s in range(20)]
    assert all(zeros)  # corner in [0, 14 - 8): every crop keeps at least one padded plane


# -- determinism ---------------------------------------------------------------------------------
def _distinct(arrays: list[np.ndarray]) -> int:
    return len({a.tobytes() for a in arrays})


def test_same_seed_same_output_different_seeds_differ(pol2, pol3):
    rng = rngs(5)
    img2 = rng.random((1, 40, 30), dtype=np.float32)
    lab2 = blocks((40, 30), rng)
    img3 = rng.standard_normal((1, 20, 18, 14)).astype(np.float32)
    lab3 = blocks((20, 18, 14), rng, classes=2)
    for pol, img, lab in ((pol2, img2, lab2), (pol3, img3, lab3)):
        outs = {"weak": [], "strong": [], "box": []}
        for seed in range(8):
            w1, y1 = pol.weak(img, lab, rngs(seed))
            w2, y2 = pol.weak(img, lab, rngs(seed))
            assert np.array_equal(w1, w2) and np.array_equal(y1, y2)
            u = pol.weak_unlabeled(img, rngs(seed))
            s1, s2 = pol.strong(u, rngs(100 + seed)), pol.strong(u, rngs(100 + seed))
            assert np.array_equal(s1, s2)
            b1, b2 = pol.cutmix_box(rngs(seed)), pol.cutmix_box(rngs(seed))
            assert np.array_equal(b1, b2)
            outs["weak"].append(w1)
            outs["strong"].append(s1)
            outs["box"].append(b1)
        for name, arrays in outs.items():
            assert _distinct(arrays) >= 3, f"{type(pol).__name__}.{name} ignores the seed"


def test_strong3d_leaves_global_torch_rng_alone(pol3):
    img = rngs(6).standard_normal((1, *P3)).astype(np.float32)
    before = torch.random.get_rng_state()
    for seed in range(4):
        pol3.strong(img, rngs(seed))
    assert torch.equal(before, torch.random.get_rng_state())


# -- strong: geometry preserved, finite values ---------------------------------------------------
def test_strong2d_is_a_monotone_intensity_map_without_blur():
    pol = Medical2D(patch_size=P2, jitter_p=1.0, blur_p=0.0)
    img = pol.weak_unlabeled(rngs(7).random((1, *P2), dtype=np.float32), rngs(7))
    order = np.argsort(img.ravel(), kind="stable")
    changed = 0
    for seed in range(10):
        s = pol.strong(img, rngs(seed))
        assert np.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
        assert np.all(np.diff(s.ravel()[order]) >= 0)  # brightness/contrast keep the ordering of pixels
        changed += not np.array_equal(s, img)
    assert changed >= 8


def test_strong2d_keeps_structure_with_blur():
    pol = Medical2D(patch_size=P2, jitter_p=1.0, blur_p=1.0)
    img = np.zeros((1, *P2), dtype=np.float32)
    img[:, :, P2[1] // 2 :] = 0.8
    img[:, :, : P2[1] // 2] = 0.2
    x = pol.weak_unlabeled(img, rngs(0))  # quantised view, as training gives it
    for seed in range(10):
        s = pol.strong(x, rngs(seed))
        assert s.shape == x.shape and np.isfinite(s).all()
        assert s[..., : P2[1] // 2].mean() < s[..., P2[1] // 2 :].mean()
        assert np.array_equal(x, pol.weak_unlabeled(img, rngs(0)))  # the weak view is not modified


def test_strong3d_negative_intensities():
    img = rngs(8).standard_normal((1, *P3)).astype(np.float32) * 2 - 0.5
    img[0, :2] = 0
    copy = img.copy()
    bias_only = Medical3D(patch_size=P3, bias_p=1.0, blur_p=0.0)
    for seed in range(6):
        s = bias_only.strong(img, rngs(seed))
        assert s.shape == img.shape and np.isfinite(s).all()
        assert np.array_equal(np.sign(s), np.sign(img))  # positive field and signed gamma keep the support
        assert not np.allclose(s, img)
    both = Medical3D(patch_size=P3, bias_p=1.0, blur_p=1.0)
    for seed in range(4):
        s = both.strong(img, rngs(seed))
        assert s.shape == img.shape and np.isfinite(s).all()
    assert np.array_equal(img, copy)


def test_strong3d_blur_keeps_structure():
    pol = Medical3D(patch_size=P3, bias_p=0.0, blur_p=1.0)
    img = np.full((1, *P3), -1.0, dtype=np.float32)
    img[:, P3[0] // 2 :] = 2.0
    for seed in range(4):
        s = pol.strong(img, rngs(seed))
        assert s[:, : P3[0] // 2].mean() < s[:, P3[0] // 2 :].mean()
        assert not np.array_equal(s, img)


def test_bias_field_matches_torchio():
    from torchio.transforms.augmentation.intensity.random_bias_field import BiasField

    rng = rngs(9)
    for shape in [(9, 12, 7), (16, 16, 12), (5, 4, 1)]:
        coeffs = rng.uniform(-0.5, 0.5, num_bias_coefficients(3))
        ref = BiasField.generate_bias_field(np.zeros((1, *shape)), 3, list(coeffs))
        np.testing.assert_allclose(bias_field(shape, coeffs), ref, rtol=1e-5)


# -- CutMix box statistics -----------------------------------------------------------------------
def expected_box_fraction(shape: tuple[int, ...], n_s: int = 200, n_r: int = 400) -> float:
    """E[box volume / patch volume | box non-empty], by quadrature over V and r.

    V ~ U(0.02, 0.4) is fixed per box while (r, corner) is redrawn until the box fits, so the accepted r has
    density proportional to the prior times P(fit | V, r) = prod over axes of (S - b + 1) / S.
    """
    n = math.prod(shape)
    s_grid = 0.02 + 0.38 * (np.arange(n_s) + 0.5) / n_s
    r = 0.3 + (1 / 0.3 - 0.3) * (np.arange(n_r) + 0.5) / n_r
    total = 0.0
    for s in s_grid:
        v = s * n
        if len(shape) == 2:
            sizes = [np.floor(np.sqrt(v * r)), np.floor(np.sqrt(v / r))]  # (h along H, w along W)
        else:
            d = np.full_like(r, np.floor(v ** (1 / 3)))
            sizes = [np.floor((v / r) ** (1 / 3)), np.floor((v * r) ** (1 / 3)), d]
        fit = np.ones_like(r)
        for b, size in zip(sizes, shape):
            fit *= np.clip(size - b + 1, 0, size) / size
        frac = np.prod(sizes, axis=0) / n
        total += (frac * fit).sum() / fit.sum()
    return total / n_s


@pytest.mark.parametrize("shape", [(64, 48), (24, 20, 16)])
def test_cutmix_box_statistics(shape):
    rng = rngs(10)
    fractions, empty = [], 0
    draws = 2000
    for _ in range(draws):
        m = sample_cutmix_box(shape, rng, p=0.5)
        assert m.dtype == np.uint8 and m.shape == shape
        if not m.any():
            empty += 1
            continue
        idx = np.nonzero(m)
        box = tuple(slice(i.min(), i.max() + 1) for i in idx)
        assert m[box].all() and m.sum() == m[box].size  # exactly one axis-aligned box
        fractions.append(m.sum() / m.size)
    assert abs(empty / draws - 0.5) < 0.05
    mean = float(np.mean(fractions))
    expected = expected_box_fraction(shape)
    assert 0.12 < expected < 0.25
    assert abs(mean - expected) < 0.015, (mean, expected)
    assert max(fractions) <= 0.4 + 1e-9


def test_cutmix_box_probability_and_elongated_patch():
    rng = rngs(11)
    assert not any(sample_cutmix_box((16, 16), rng, p=0.0).any() for _ in range(50))
    assert all(sample_cutmix_box((16, 16), rng, p=1.0).any() for _ in range(50))
    # A patch in which large boxes can never fit still terminates with a box inside the patch.
    m = sample_cutmix_box((64, 2), rng, p=1.0, size_min=0.39, size_max=0.4)
    assert m.any() and m.shape == (64, 2)


def test_policy_cutmix_p():
    pol = Medical3D(patch_size=(8, 8, 8), cutmix_p=0.0)
    assert not any(pol.cutmix_box(rngs(s)).any() for s in range(20))


# -- mixing ops ----------------------------------------------------------------------------------
def _boxes(spatial: tuple[int, ...], batch: int) -> torch.Tensor:
    rng = rngs(12)
    return torch.from_numpy(np.stack([sample_cutmix_box(spatial, rng, p=1.0) for _ in range(batch)]))


@pytest.mark.parametrize("spatial", [(8, 6), (5, 4, 3)])
def test_cutmix_takes_each_pixel_from_the_right_source(spatial):
    b, c = 3, 2
    n = b * c * math.prod(spatial)
    x = torch.arange(n, dtype=torch.float32).reshape(b, c, *spatial)
    x_mix = -1 - x
    box = _boxes(spatial, b)
    box[1] = 0  # one sample without a box
    for kind in (torch.uint8, torch.bool, torch.float32, torch.int64):
        out = cutmix(x, x_mix, box.to(kind))
        inside = box.bool().unsqueeze(1).expand_as(x)
        assert torch.equal(out[inside], x_mix[inside]) and torch.equal(out[~inside], x[~inside])
    assert torch.equal(cutmix(x, x_mix, box)[1], x[1])
    assert torch.equal(x, torch.arange(n, dtype=torch.float32).reshape(b, c, *spatial))  # inputs untouched

    t = torch.randint(0, 4, (b, *spatial))
    t_mix = torch.randint(4, 8, (b, *spatial))
    out_t = cutmix_target(t, t_mix, box)
    assert out_t.dtype == t.dtype
    inside = box.bool()
    assert torch.equal(out_t[inside], t_mix[inside]) and torch.equal(out_t[~inside], t[~inside])
    conf, conf_mix = torch.rand(b, *spatial), torch.rand(b, *spatial) + 2
    out_c = cutmix_target(conf, conf_mix, box)
    assert torch.equal(out_c > 2, box.bool())
    prob = torch.zeros(b, 4, *spatial)
    out_p = cutmix_target(prob, prob + 1, box)  # probability maps: box broadcast over classes
    assert torch.equal(out_p[:, 0] == 1, box.bool())


def test_cutmix_shape_errors():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError):
        cutmix(x, x, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError):
        cutmix(x, torch.zeros(2, 1, 4, 5), torch.zeros(2, 4, 4))


@pytest.mark.parametrize("shape", [(256, 256), (112, 112, 80), (9, 12), (7, 10, 5), (3, 4)])
def test_bcp_mask_box(shape):
    sizes = [int(s * 2 / 3 + 1e-9) for s in shape]
    assert shape != (256, 256) or sizes == [170, 170]
    assert shape != (112, 112, 80) or sizes == [74, 74, 53]
    seeds = range(3) if math.prod(shape) > 10_000 else range(40)
    corners = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        m = bcp_mask(shape, generator=g)
        assert m.dtype == torch.float32 and tuple(m.shape) == shape
        zero = np.argwhere(m.numpy() == 0)
        lo, hi = zero.min(0), zero.max(0)
        assert [int(v) for v in hi - lo + 1] == sizes
        assert len(zero) == math.prod(sizes)
        assert all(0 <= int(c) < s - b for c, s, b in zip(lo, shape, sizes))
        corners.append(tuple(int(c) for c in lo))
        assert torch.equal(m, bcp_mask(shape, generator=torch.Generator().manual_seed(seed)))
    if len(seeds) > 10:
        assert len(set(corners)) > 1


def test_copy_paste():
    m = bcp_mask((6, 9), generator=torch.Generator().manual_seed(0))
    a = torch.full((2, 3, 6, 9), 1.0)
    b = torch.full((2, 3, 6, 9), 5.0)
    out = copy_paste(a, b, m)
    assert torch.equal(out, torch.where(m.bool(), a, b))
    la, lb = torch.zeros(2, 6, 9, dtype=torch.long), torch.ones(2, 6, 9, dtype=torch.long)
    lab = copy_paste(la, lb, m)
    assert lab.dtype == torch.long and torch.equal(lab, (m == 0).long().expand(2, 6, 9))
    per_sample = torch.stack([m, 1 - m])  # (B, *S) for (B, *S) and (B, 1, *S) for (B, C, *S)
    assert torch.equal(copy_paste(la, lb, per_sample)[1], (m == 1).long())
    assert torch.equal(copy_paste(a, b, per_sample.unsqueeze(1))[1, 2], torch.where(m.bool(), 5.0, 1.0))


def test_policies_pickle_for_loader_workers():
    import pickle

    rng = rngs(13)
    for pol, img in (
        (Medical2D(patch_size=P2), rng.random((1, *P2), dtype=np.float32)),
        (Medical3D(patch_size=P3, blur_p=1.0), rng.standard_normal((1, *P3)).astype(np.float32)),
    ):
        clone = pickle.loads(pickle.dumps(pol))
        assert np.array_equal(clone.strong(img, rngs(1)), pol.strong(img, rngs(1)))


def test_package_exports():
    import semiseg.augment as aug

    assert aug.Medical2D is Medical2D and aug.Medical3D is Medical3D and aug.cutmix is cutmix
    assert issubclass(Medical2D, aug.Policy) and issubclass(Medical3D, aug.Policy)
