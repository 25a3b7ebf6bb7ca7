"""Slice-wise and sliding-window inference against direct re-implementations of the published loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import zoom
from torch import nn

from semiseg.evaluation.inference import (
    SliceInferer,
    SlidingWindowInferer,
    inference_mode,
    predict_slices,
    sliding_window,
    window_starts,
)

torch.set_num_threads(2)


# --------------------------------------------------------------------------------------------------------
# Reference loops, written as in the published test scripts (CPU instead of .cuda()).
# --------------------------------------------------------------------------------------------------------


def official_slices(net: nn.Module, image: np.ndarray, patch_size=(256, 256)) -> np.ndarray:
    """SSL4MIS ``test_2D_fully.test_single_volume`` / BCP / CrossMatch ACDC test."""
    prediction = np.zeros_like(image)
    for ind in range(image.shape[0]):
        slice_ = image[ind, :, :]
        x, y = slice_.shape[0], slice_.shape[1]
        slice_ = zoom(slice_, (patch_size[0] / x, patch_size[1] / y), order=0)
        inp = torch.from_numpy(slice_).unsqueeze(0).unsqueeze(0).float()
        net.eval()
        with torch.no_grad():
            out = torch.argmax(torch.softmax(net(inp), dim=1), dim=1).squeeze(0)
            out = out.cpu().detach().numpy()
            pred = zoom(out, (x / patch_size[0], y / patch_size[1]), order=0)
            prediction[ind] = pred
    return prediction


def official_bilinear(net: nn.Module, image: np.ndarray, size=256) -> np.ndarray:
    """UniMatch / CrossMatch in-training ACDC validation (whole volume as a batch)."""
    img = torch.from_numpy(image).float()[None]  # (1, D, H, W)
    h, w = img.shape[-2:]
    img = img.permute(1, 0, 2, 3)
    img = F.interpolate(img, (size, size), mode="bilinear", align_corners=False)
    net.eval()
    with torch.no_grad():
        pred = net(img)
        pred = F.interpolate(pred, (h, w), mode="bilinear", align_corners=False)
    return pred.argmax(dim=1).numpy()


def official_single_case(net, image, stride_xy, stride_z, patch_size, num_classes=1):
    """UA-MT ``test_util.test_single_case`` (also CrossMatch/BCP LA)."""
    w, h, d = image.shape
    add_pad = False
    pads = []
    for s, p in zip((w, h, d), patch_size):
        if s < p:
            pads.append(p - s)
            add_pad = True
        else:
            pads.append(0)
    (wl, wr), (hl, hr), (dl, dr) = [(q // 2, q - q // 2) for q in pads]
    if add_pad:
        image = np.pad(image, [(wl, wr), (hl, hr), (dl, dr)], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape).astype(np.float32)
    cnt = np.zeros(image.shape).astype(np.float32)
    for x in range(0, sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(0, sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(0, sz):
                zs = min(stride_z * z, dd - patch_size[2])
                patch = image[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]]
                patch = torch.from_numpy(np.expand_dims(np.expand_dims(patch, 0), 0).astype(np.float32))
                with torch.no_grad():
                    yy = F.softmax(net(patch), dim=1).cpu().data.numpy()[0]
                px, py, pz = patch_size
                win = (slice(xs, xs + px), slice(ys, ys + py), slice(zs, zs + pz))
                score_map[(slice(None), *win)] = score_map[(slice(None), *win)] + yy
                cnt[win] = cnt[win] + 1
    score_map = score_map / np.expand_dims(cnt, axis=0)
    label_map = np.argmax(score_map, axis=0)
    if add_pad:
        label_map = label_map[wl : wl + w, hl : hl + h, dl : dl + d]
    return label_map


# --------------------------------------------------------------------------------------------------------
# Tiny random nets
# --------------------------------------------------------------------------------------------------------


def net2d(num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, num_classes, 3, padding=1)
    )


def net3d(num_classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, num_classes, 3, padding=1))


# --------------------------------------------------------------------------------------------------------
# Slice-wise
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37, 29), (2, 64, 50), (4, 20, 33)])
def test_predict_slices_nearest_equals_official_loop(shape):
    rng = np.random.default_rng(1)
    vol = rng.random(shape, dtype=np.float32)
    net = net2d()
    ref = official_slices(net, vol, (48, 40))
    got = predict_slices(net, vol, num_classes=4, size=(48, 40), batch_size=2, mode="nearest")
    assert got.shape == shape and got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    # channel-first input gives the same answer
    np.testing.assert_array_equal(predict_slices(net, vol[None], size=(48, 40), mode="nearest"), ref)


def test_predict_slices_nearest_official_size_256():
    rng = np.random.default_rng(2)
    vol = rng.random((2, 70, 55), dtype=np.float32)
    net = net2d(seed=3)
    np.testing.assert_array_equal(predict_slices(net, vol, 4), official_slices(net, vol))


def test_torch_nearest_is_not_scipy_nearest():
    # Why predict_slices gathers with scipy's own index map instead of F.interpolate(mode="nearest").
    x = np.arange(37 * 29, dtype=np.float32).reshape(37, 29)
    a = zoom(x, (256 / 37, 256 / 29), order=0)
    b = F.interpolate(torch.from_numpy(x)[None, None], (256, 256), mode="nearest")[0, 0].numpy()
    assert not np.array_equal(a, b)


def test_predict_slices_bilinear_equals_validation_loop():
    rng = np.random.default_rng(4)
    vol = rng.random((5, 45, 38), dtype=np.float32)
    net = net2d(seed=5)
    got = predict_slices(net, vol, 4, size=(64, 64), batch_size=16, mode="bilinear")
    np.testing.assert_array_equal(got, official_bilinear(net, vol, 64))


def test_mode_is_restored():
    net = net2d()
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model keeps its own flag
    predict_slices(net, np.zeros((1, 8, 8), np.float32), size=(8, 8))
    assert net.training and net[0].training and not net[1].training
    net.eval()
    with inference_mode(net):
        pass
    assert not net.training


def test_slice_inferer_wrapper():
    vol = np.random.default_rng(0).random((2, 30, 30), dtype=np.float32)
    net = net2d()
    inf = SliceInferer(size=(32, 32))
    np.testing.assert_array_equal(inf(net, vol), predict_slices(net, vol, size=(32, 32)))
    np.testing.assert_array_equal(inf.predictor(net)(vol), inf(net, vol))
    np.testing.assert_array_equal(predict_slices(net, torch.from_numpy(vol), size=(32, 32)), inf(net, vol))
    with pytest.raises(ValueError):
        SliceInferer(mode="bicubic")


# --------------------------------------------------------------------------------------------------------
# Sliding window
# --------------------------------------------------------------------------------------------------------


def test_window_starts():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 3) == [0]
    s = window_starts(180, 112, 18)
    assert s[0] == 0 and s[-1] == 68 and len(s) == math.ceil(68 / 18) + 1


@pytest.mark.parametrize(
    "shape,patch,strides",
    [
        ((26, 22, 18), (16, 16, 12), (5, 5, 3)),  # several windows, last ones clamped
        ((19, 17, 11), (12, 12, 8), (4, 4, 2)),
        ((10, 9, 7), (12, 12, 8), (4, 4, 2)),  # smaller than the patch on every axis: padding
        ((14, 9, 10), (12, 12, 8), (4, 4, 2)),  # smaller on one axis only (odd padding)
    ],
)
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_sliding_window_equals_official_loop(shape, patch, strides, sw_batch_size):
    rng = np.random.default_rng(sum(shape))
    image = rng.standard_normal(shape).astype(np.float32)
    net = net3d(num_classes=2, seed=sum(patch))
    net.eval()
    ref = official_single_case(net, image, strides[0], strides[2], patch, num_classes=2)
    got = sliding_window(net, image, patch, num_classes=2, stride=strides, sw_batch_size=sw_batch_size)
    assert got.shape == shape
    np.testing.assert_array_equal(got, ref)


def test_sliding_window_multiclass_and_probs():
    image = np.random.default_rng(7).standard_normal((1, 21, 18, 13)).astype(np.float32)
    net = net3d(num_classes=3, seed=1)
    ref = official_single_case(net, image[0], 5, 3, (12, 10, 8), num_classes=3)
    labels, probs = sliding_window(net, image, (12, 10, 8), stride=(5, 5, 3), return_probs=True)
    np.testing.assert_array_equal(labels, ref)
    assert probs.shape == (3, 21, 18, 13) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), labels)


def test_sliding_window_gaussian_and_2d():
    image = np.random.default_rng(8).standard_normal((17, 15, 9)).astype(np.float32)
    net = net3d(seed=2)
    g = sliding_window(net, image, (8, 8, 8), weighting="gaussian", overlap=0.5)
    assert g.shape == image.shape and g.dtype == np.int64
    # a 2D sliding window with a 2D net; full-image patch equals a plain forward pass
    img2 = np.random.default_rng(9).random((20, 24), dtype=np.float32)
    n2 = net2d(num_classes=4)
    n2.eval()
    plain = n2(torch.from_numpy(img2)[None, None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(sliding_window(n2, img2, (20, 24)), plain)
    assert sliding_window(n2, img2, (8, 8), stride=3, weighting="gaussian").shape == (20, 24)


def test_sliding_window_inferer_wrapper():
    image = np.random.default_rng(10).standard_normal((16, 14, 10)).astype(np.float32)
    net = net3d()
    inf = SlidingWindowInferer((8, 8, 8), stride=(4, 4, 2), sw_batch_size=5)
    np.testing.assert_array_equal(inf(net, image), official_single_case(net, image, 4, 2, (8, 8, 8), 2))
    with pytest.raises(ValueError):
        sliding_window(net, image, (8, 8, 8), weighting="triangle")
    with pytest.raises(ValueError):
        sliding_window(net, image, (8, 8, 8), num_classes=5)
    with pytest.raises(ValueError):
        sliding_window(net, image, (8, 8, 8), stride=(9, 4, 4))
    ro = image.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(sliding_window(net, ro, (8, 8, 8), stride=(4, 4, 2)), inf(net, image))
