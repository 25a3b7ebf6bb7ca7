"""The speed options (semiseg.engine.perf): measured defaults, the compile fallback, the CPU bf16 warning."""

from __future__ import annotations

import pytest
import torch

from semiseg import registry


def test_channels_last_auto_is_on_on_the_cpu_only():
    from semiseg.engine.perf import use_channels_last

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last(None, 3, cpu) and use_channels_last(None, 2, cpu)
    assert not use_channels_last(None, 3, gpu)
    assert use_channels_last(True, 2, cpu) and not use_channels_last(False, 3, cpu)


def test_compile_falls_back_to_eager_once_when_the_compiler_fails(monkeypatch):
    from semiseg.engine import perf

    calls = []

    def broken_compile(fn, **kw):
        def compiled(*a, **k):
            calls.append(1)
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    model = registry.create_backbone("unet", in_channels=1, num_classes=2, width=0.25).eval()
    x = torch.randn(1, 1, 32, 32)
    expected = model(x)
    assert perf.compile_backbone(model)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        got = model(x)
    torch.testing.assert_close(got, expected)
    model(x)  # no second attempt, no second warning
    assert len(calls) == 2  # encode and decode tried once each
    assert set(model.state_dict()) == set(registry.create_backbone("unet", width=0.25).state_dict())


@pytest.mark.parametrize("flags, native", [
    ("flags\t: fpu avx2 fma\n", False),
    ("flags\t: fpu avx2 avx512f avx512_bf16\n", True),
    ("flags\t: fpu avx2 amx_bf16 amx_tile\n", True),
    ("processor\t: 1\n", None),  # no flags line: unknown, no warning
])
def test_amp_on_a_cpu_without_native_bf16_warns(monkeypatch, tmp_path, flags, native):
    import warnings

    from semiseg.engine import perf

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + flags)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    assert perf.cpu_has_native_bf16() is native
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        perf.warn_slow_cpu_amp(torch.device("cpu"), amp=True)
        perf.warn_slow_cpu_amp(torch.device("cpu"), amp=False)  # without --amp: never
        perf.warn_slow_cpu_amp(torch.device("meta"), amp=True)  # not a CPU: never
    messages = [str(w.message) for w in seen]
    assert len(messages) == (1 if native is False else 0)
    assert all("without hardware support" in m and "drop --amp" in m for m in messages)


def test_official_crossmatch_plan_spends_7b_13b_against_our_5b_11b():
    """`--opt plan=official` reproduces the official passes (benchmarks/perf.md times it against the default)."""
    from semiseg.algorithms.base import StepContext
    from semiseg.algorithms.crossmatch import CrossMatch

    net = registry.create_backbone("unet", in_channels=1, num_classes=4, width=0.25)
    images = {"enc": 0, "dec": 0}
    encode, decode = net.encode, net.decode
    net.encode = lambda x: images.__setitem__("enc", images["enc"] + len(x)) or encode(x)
    net.decode = lambda f: images.__setitem__("dec", images["dec"] + len(f[0])) or decode(f)
    b, g = 2, torch.Generator().manual_seed(0)
    batch = {k: torch.randn(b, 1, 32, 32, generator=g) for k in ("x", "u_w", "u_s1", "u_s2", "u_w_mix",
                                                                  "u_s1_mix", "u_s2_mix")}
    batch["y"] = torch.randint(0, 4, (b, 32, 32), generator=g)
    batch["box1"] = batch["box2"] = torch.zeros(b, 32, 32, dtype=torch.uint8)
    algo = CrossMatch()
    algo.setup(num_classes=4, dim=2)
    ctx = StepContext(iteration=5, total_iterations=10)
    ours = algo.step(net, batch, ctx)
    assert images == {"enc": 5 * b, "dec": 11 * b}
    algo = CrossMatch(plan="official")
    algo.setup(num_classes=4, dim=2)
    images.update(enc=0, dec=0)
    official = algo.step(net, batch, ctx)
    assert images == {"enc": 7 * b, "dec": 13 * b}
    assert set(official.losses) == set(ours.losses)  # the extra outputs feed no loss
