"""Backbones: reference parameter counts, the encode/decode contract, gradients and error messages."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

from semiseg.backbones import SegBackbone
from semiseg.backbones.smp import smp
from semiseg.backbones.unet import unet
from semiseg.backbones.unet3d import unet3d
from semiseg.backbones.vnet import vnet
from semiseg.errors import ConfigError
from semiseg.registry import check_kwargs


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conv_block(ci: int, co: int) -> int:
    """Conv3x3(+bias) - BN - LeakyReLU - Dropout - Conv3x3(+bias) - BN - LeakyReLU."""
    return (9 * ci * co + co) + 2 * co + (9 * co * co + co) + 2 * co


def test_unet_parameter_count_matches_reference_layout():
    ch = [16, 32, 64, 128, 256]
    enc = conv_block(1, 16) + sum(conv_block(ch[i], ch[i + 1]) for i in range(4))
    dec = sum((ch[i + 1] * ch[i] + ch[i]) + conv_block(2 * ch[i], ch[i]) for i in range(4))
    by_hand = enc + dec + (9 * 16 * 4 + 4)
    assert by_hand == 1_813_764
    assert n_params(unet(in_channels=1, num_classes=4)) == 1_813_764  # "about 1.81 M"


def test_vnet_parameter_count_matches_reference():
    m = vnet(in_channels=1, num_classes=2)
    assert n_params(m) == 9_448_866
    # Papers quote 9.443 M: that is the count without the BatchNorm affine parameters.
    no_bn = sum(p.numel() for mod in m.modules() if not isinstance(mod, nn.BatchNorm3d)
                for p in mod.parameters(recurse=False))
    assert no_bn == 9_443_266
    assert round(no_bn / 1e6, 2) == 9.44


def test_state_dict_keys_follow_reference_names():
    u = unet().state_dict()
    assert {"encoder.in_conv.conv_conv.0.weight", "encoder.down4.maxpool_conv.1.conv_conv.4.weight",
            "decoder.up1.conv1x1.weight", "decoder.up4.conv.conv_conv.0.weight",
            "decoder.out_conv.weight"} <= set(u)
    v = vnet(width=0.25).state_dict()
    assert {"block_one.conv.0.weight", "block_two_dw.conv.1.running_mean", "block_five_up.conv.0.weight",
            "block_nine.conv.0.weight", "out_conv.weight"} <= set(v)


CASES = {
    "unet": (lambda: unet(in_channels=1, num_classes=4, width=0.25), (2, 1, 32, 32)),
    "unet_nodrop": (lambda: unet(in_channels=2, num_classes=3, width=0.25, dropout=False), (2, 2, 32, 32)),
    "vnet": (lambda: vnet(in_channels=1, num_classes=2, width=0.25), (1, 1, 32, 32, 32)),
    "unet3d": (lambda: unet3d(in_channels=1, num_classes=2, width=0.25), (1, 1, 32, 32, 32)),
    "smp_resnet18": (lambda: smp(in_channels=1, num_classes=4, encoder="resnet18"), (2, 1, 64, 64)),
    "smp_fpn_timm": (lambda: smp(in_channels=1, num_classes=3, arch="FPN", encoder="tu-resnet10t"),
                     (2, 1, 64, 64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_contract_shapes_and_gradients(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    m = build()
    assert isinstance(m, SegBackbone) and m.dim == len(shape) - 2
    assert m.in_channels == shape[1]
    x = torch.randn(*shape)

    m.eval()
    with torch.no_grad():
        feats = m.encode(x)
        y = m(x)
        assert isinstance(feats, list) and len(feats) >= 4
        # deepest last: the last feature has the smallest spatial size
        assert feats[-1].shape[2:].numel() == min(f.shape[2:].numel() for f in feats)
        assert y.shape == (shape[0], m.num_classes, *shape[2:])
        assert torch.allclose(m.decode(feats), y)

    m.train()
    out = m(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


def test_width_multiplier_reduces_parameters():
    assert n_params(unet(width=0.5)) < n_params(unet())
    assert n_params(vnet(width=0.5)) < n_params(vnet())
    assert n_params(unet3d(width=0.5)) < n_params(unet3d())


def test_dropout_switches():
    assert all(mod.p == 0 for mod in unet(dropout=False).modules() if isinstance(mod, nn.Dropout))
    ps = {mod.p for mod in unet().modules() if isinstance(mod, nn.Dropout)}
    assert ps == {0.0, 0.05, 0.1, 0.2, 0.3, 0.5}
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    m = vnet(width=0.25, has_dropout=True).train()
    assert not torch.allclose(m(x), m(x))  # Dropout3d(0.5) active in training
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    assert not any(isinstance(mod, nn.Dropout3d) and mod.training for mod in m.modules())


@pytest.mark.parametrize("build, shape", [
    (lambda: unet(width=0.25), (1, 1, 30, 32)),
    (lambda: vnet(width=0.25), (1, 1, 24, 32, 32)),
    (lambda: unet3d(width=0.25), (1, 1, 32, 32, 40)),
])
def test_indivisible_input_is_a_clear_error(build, shape):
    with pytest.raises(ValueError, match="divisible by 16.*pad"):
        build().encode(torch.randn(*shape))


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="C=1"):
        unet(width=0.25).encode(torch.randn(1, 3, 32, 32))


def test_smp_divisibility_and_names():
    with pytest.raises(ValueError, match="divisible by 32"):
        smp(arch="FPN", encoder="resnet18").encode(torch.randn(1, 1, 48, 48))
    with pytest.raises(ConfigError, match="Unknown smp architecture 'Unett'.*'Unet'"):
        smp(arch="Unett")
    with pytest.raises(ConfigError, match="Unknown smp encoder 'resnet188'.*'resnet18'"):
        smp(encoder="resnet188")
    with pytest.raises(ConfigError, match="Unknown timm encoder 'tu-resnet10tt'.*'resnet10t'"):
        smp(encoder="tu-resnet10tt")
    upp = smp(arch="unetplusplus", encoder="resnet18", encoder_depth=4)  # case-insensitive, shorter depth
    assert type(upp.model).__name__ == "UnetPlusPlus" and len(upp.encode(torch.randn(2, 1, 32, 32))) == 5


def test_smp_loads_local_encoder_and_model_weights(tmp_path):
    torch.manual_seed(0)
    rgb = smp(in_channels=3, encoder="resnet18")
    enc_state = dict(rgb.model.encoder.state_dict())
    enc_state["fc.weight"] = torch.zeros(10, 512)  # a classification head the encoder does not have
    torch.save({"state_dict": enc_state}, tmp_path / "enc.pth")
    with pytest.warns(UserWarning, match="unexpected 1 \\[fc.weight\\]"):
        grey = smp(in_channels=1, encoder="resnet18", weights=str(tmp_path / "enc.pth"))
    rep = grey.weights_report
    assert rep["into"] == "encoder" and rep["adapted_in_channels"] == ["conv1.weight"]
    w3 = rgb.model.encoder.conv1.weight
    assert torch.allclose(grey.model.encoder.conv1.weight, w3.sum(dim=1, keepdim=True))
    assert torch.equal(grey.model.encoder.layer4[1].conv2.weight, rgb.model.encoder.layer4[1].conv2.weight)

    torch.save(grey.model.state_dict(), tmp_path / "model.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a perfect fit reports nothing
        again = smp(in_channels=1, encoder="resnet18", weights=str(tmp_path / "model.pth"))
    assert again.weights_report["into"] == "model" and not again.weights_report["missing"]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), grey.eval()(x))

    with pytest.raises(ConfigError, match="does not exist"):
        smp(encoder="resnet18", weights=str(tmp_path / "missing.pth"))


def test_registry_rejects_misspelt_option():
    with pytest.raises(ConfigError, match="'widht' \\(did you mean 'width'\\?\\)"):
        check_kwargs(unet, {"widht": 1}, "backbone 'unet'")


def test_create_backbone_through_registry():
    for mod in ("semiseg.data", "semiseg.augment", "semiseg.algorithms", "semiseg.presets"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            pytest.skip(f"{mod} not importable yet: {e}")
    from semiseg.registry import create_backbone, list_models

    assert {"unet", "vnet", "unet3d", "smp"} <= set(list_models())
    with pytest.raises(ConfigError, match="widht"):
        create_backbone("unet", widht=1)
    m = create_backbone("vnet", width=0.25, has_dropout=False)
    assert m.describe()["dim"] == 3


def test_an_incomplete_backbone_policy_or_algorithm_cannot_be_built():
    """A plugin that forgets a required method fails where it is built, naming the method."""
    from semiseg.algorithms.base import Algorithm
    from semiseg.augment.base import Policy
    from semiseg.backbones.base import SegBackbone

    class EncoderOnly(SegBackbone):
        def encode(self, x):
            return [x]

    class NoStep(Algorithm):
        pass

    class WeakOnly(Policy):
        def weak(self, image, label, rng):
            return image, label

    with pytest.raises(TypeError, match="decode"):
        EncoderOnly()
    with pytest.raises(TypeError, match="step"):
        NoStep()
    with pytest.raises(TypeError, match="strong"):
        WeakOnly(patch_size=(8, 8))
