"""The registries: decorator registration, keyword validation, close-match errors and plugins (files, modules,
entry points, broken ones)."""

from __future__ import annotations

import textwrap
from importlib import metadata

import pytest
from click.testing import CliRunner

from semiseg import registry
from semiseg.cli import cli
from semiseg.errors import ConfigError


def flat(text: str) -> str:
    """Console output with its soft line breaks undone, for substring checks."""
    return " ".join(text.split())


def table_row(text: str, name: str) -> list[str]:
    """The cells of the first row of a `semiseg list` table whose first cell is ``name``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row '{name}' in:\n{text}")


# -- a table of its own -------------------------------------------------------------------------------------------
def test_decorator_registration_in_a_fresh_registry():
    reg = registry.Registry("widget")

    @reg.register()
    def small(size: int = 1):
        """A small widget."""
        return ("small", size)

    @reg.register("big-one")
    def big(size: int = 10, *, color: str = "red"):
        return ("big", size, color)

    class Named:
        name = "from-attribute"

        def __init__(self, depth: int = 2) -> None:
            self.depth = depth

    reg.register()(Named)

    assert reg.names() == ["big-one", "from-attribute", "small"]
    assert "small" in reg and "big" not in reg
    assert reg.get("small") is small
    assert reg.create("small", size=3) == ("small", 3)
    assert reg.create("big-one", color="blue") == ("big", 10, "blue")
    assert reg.create("from-attribute", depth=5).depth == 5
    assert reg.origin("small") == "semiseg"


def test_create_validates_keyword_arguments():
    reg = registry.Registry("widget")

    @reg.register("w")
    def w(threshold: float = 0.95, width: float = 1.0):
        return threshold, width

    with pytest.raises(ConfigError) as e:
        reg.create("w", treshold=0.5)
    msg = str(e.value)
    assert "widget 'w' does not take option 'treshold'" in msg
    assert "did you mean 'threshold'" in msg
    assert "it takes: threshold, width" in msg
    # several bad keys are all named; one with no close match gets no suggestion
    with pytest.raises(ConfigError, match="'zzz'.*'widht' \\(did you mean 'width'\\?\\)"):
        reg.create("w", zzz=1, widht=2)
    # a factory with **kwargs takes anything
    reg.register("any")(lambda **kw: kw)
    assert reg.create("any", whatever=1) == {"whatever": 1}


def test_unknown_name_lists_close_matches_and_all_known():
    reg = registry.Registry("widget")
    for n in ("crossmatch", "fixmatch", "unimatch", "supervised"):
        reg.register(n)(lambda n=n: n)
    with pytest.raises(ConfigError) as e:
        reg.get("crossmach")
    msg = str(e.value)
    assert msg.startswith("Unknown widget 'crossmach'. Did you mean 'crossmatch'")
    assert "Known: crossmatch, fixmatch, supervised, unimatch" in msg
    with pytest.raises(ConfigError) as e:
        reg.create("qqqqqqqqqq")
    assert "Did you mean" not in str(e.value) and "Known:" in str(e.value)


def test_duplicate_registration_is_an_error():
    reg = registry.Registry("widget")

    @reg.register("a")
    def first():
        return 1

    reg.register("a")(first)  # the same object again (a re-imported module) is harmless
    with pytest.raises(ConfigError, match="widget 'a' is registered twice"):

        @reg.register("a")
        def second():
            return 2

    assert reg.create("a") == 1


def test_global_tables_hold_the_builtins():
    builtins = {"supervised", "fixmatch", "unimatch", "crossmatch", "meanteacher", "uamt", "bcp", "em", "ict", "cps",
                "cct", "urpc", "abd", "admt"}
    assert builtins <= set(registry.ALGORITHMS.names())
    assert {"unet", "vnet", "unet3d", "smp"} <= set(registry.list_models())
    assert {"synthetic", "acdc", "la", "nifti", "folder2d"} <= set(registry.DATASETS.names())
    with pytest.raises(ConfigError, match="Unknown backbone 'vnett'. Did you mean 'vnet'"):
        registry.create_backbone("vnett")
    with pytest.raises(ConfigError, match="does not take option 'widht' \\(did you mean 'width'\\?\\)"):
        registry.create_backbone("unet", widht=0.5)
    with pytest.raises(ConfigError, match="algorithm 'fixmatch' does not take option 'tau'"):
        registry.create_algorithm("fixmatch", tau=0.9)


# -- plugins ------------------------------------------------------------------------------------------------------
PLUGIN_SOURCE = '''
import torch.nn.functional as F
from torch import nn

from semiseg.algorithms import Algorithm, StepResult
from semiseg.registry import register_algorithm, register_backbone


@register_backbone("{prefix}_net")
def tiny_net(in_channels: int = 1, num_classes: int = 2):
    """A 1x1 convolution (test plugin)."""
    return nn.Conv2d(in_channels, num_classes, 1)


@register_algorithm("{prefix}_ce")
class PluginCE(Algorithm):
    """Cross-entropy on labeled images only (test plugin)."""

    needs = ("labeled",)

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def step(self, model, batch, ctx):
        return StepResult({{"ce": self.weight * F.cross_entropy(model(batch["x"]), batch["y"])}})
'''


def write_plugin(path, prefix: str):
    path.write_text(textwrap.dedent(PLUGIN_SOURCE.format(prefix=prefix)))
    return path


def test_load_plugin_from_a_file(tmp_path, clean_registry):
    plugin = write_plugin(tmp_path / "myplug.py", "fileplug")
    registry.load_plugin(str(plugin))
    assert "fileplug_net" in registry.BACKBONES and "fileplug_ce" in registry.ALGORITHMS
    assert registry.BACKBONES.origin("fileplug_net") == "plugin:myplug.py"
    assert registry.ALGORITHMS.origin("fileplug_ce") == "plugin:myplug.py"
    assert str(plugin) in registry.loaded_plugins()
    net = registry.create_backbone("fileplug_net", num_classes=3)
    assert net.out_channels == 3
    algo = registry.create_algorithm("fileplug_ce", weight=0.5)
    assert algo.weight == 0.5
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        registry.create_algorithm("fileplug_ce", wieght=0.5)
    registry.load_plugin(str(plugin))  # loading twice is a no-op, not a duplicate registration


def test_load_plugin_from_a_module_name(tmp_path, monkeypatch, clean_registry):
    write_plugin(tmp_path / "semiseg_plugin_modplug.py", "modplug")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load_plugin("semiseg_plugin_modplug")
    assert registry.BACKBONES.origin("modplug_net") == "plugin:semiseg_plugin_modplug"


def test_load_plugin_errors(tmp_path, clean_registry):
    with pytest.raises(ConfigError, match="Plugin file .*nope.py' does not exist"):
        registry.load_plugin(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match="Plugin module 'no_such_semiseg_plugin' cannot be imported"):
        registry.load_plugin("no_such_semiseg_plugin")


def test_cli_plugin_flag_lists_and_trains_the_plugin(tmp_path, clean_registry):
    plugin = write_plugin(tmp_path / "cliplug.py", "cliplug")
    runner = CliRunner()
    res = runner.invoke(cli, ["--plugin", str(plugin), "list"])
    assert res.exit_code == 0, res.output
    assert table_row(res.stdout, "cliplug_net")[1:] == ["plugin:cliplug.py", "A 1x1 convolution (test plugin)."]
    assert table_row(res.stdout, "cliplug_ce")[1] == "plugin:cliplug.py"
    assert table_row(res.stdout, "unet")[1] == "semiseg"
    assert f"plugins loaded: {plugin}" in flat(res.stdout)
    # the plugin's algorithm and backbone train from the command line, and the run records the plugin
    run = tmp_path / "run"
    res = runner.invoke(cli, [
        "train", "--plugin", str(plugin), "--algo", "cliplug_ce", "--opt", "weight=0.5", "--backbone",
        "cliplug_net", "--data-opt", "size=[32,32]", "--data-opt", "n_train=4", "--data-opt", "n_val=1",
        "--data-opt", "num_classes=2", "--labeled", "2", "--iterations", "2", "--batch-size", "2",
        "--quiet", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "last.pt").is_file()
    assert str(plugin) in (run / "config.yaml").read_text()


# -- entry points -------------------------------------------------------------------------------------------------
def fake_entry_points(monkeypatch, *eps: metadata.EntryPoint) -> list[str]:
    """Make ``metadata.entry_points(group=...)`` as called by semiseg.registry return ``eps``."""
    calls: list[str] = []

    def entry_points(**kw):
        calls.append(kw.get("group"))
        return [ep for ep in eps if ep.group == kw.get("group")]

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    return calls


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, clean_registry):
    write_plugin(tmp_path / "fake_semiseg_ep_mod.py", "epmod")
    (tmp_path / "fake_semiseg_ep_fn.py").write_text(textwrap.dedent('''
        from semiseg.registry import register_dataset

        def register():
            @register_dataset("epfn_data")
            def epfn_data(root: str | None = None):
                """Registered by an entry-point function."""
                return root
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = fake_entry_points(
        monkeypatch,
        metadata.EntryPoint(name="epmod", value="fake_semiseg_ep_mod", group=registry.ENTRY_POINT_GROUP),
        metadata.EntryPoint(name="epfn", value="fake_semiseg_ep_fn:register", group=registry.ENTRY_POINT_GROUP),
        metadata.EntryPoint(name="other", value="no_such_module", group="some.other.group"),
    )
    # the built-ins are already loaded in this process; go through first-use discovery again as the CLI does
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    res = CliRunner().invoke(cli, ["list"])
    assert res.exit_code == 0, res.output
    assert calls.count(registry.ENTRY_POINT_GROUP) == 1
    assert registry.BACKBONES.origin("epmod_net") == "plugin:epmod"
    assert registry.ALGORITHMS.origin("epmod_ce") == "plugin:epmod"
    assert registry.DATASETS.origin("epfn_data") == "plugin:epfn"
    assert registry.BACKBONES.origin("unet") == "semiseg"
    assert table_row(res.stdout, "epmod_net")[1] == "plugin:epmod"
    assert table_row(res.stdout, "epfn_data")[1] == "plugin:epfn"
    assert "fake_semiseg_ep_mod" in flat(res.stdout).split("plugins loaded:")[1]
    # discovery runs once: a second pass finds nothing new
    assert registry.load_entry_point_plugins() == []


def test_broken_entry_point_plugin_warns_and_the_cli_still_works(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "fake_semiseg_ep_broken.py").write_text("raise RuntimeError('plugin exploded on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(
        monkeypatch,
        metadata.EntryPoint(name="broken", value="fake_semiseg_ep_broken", group=registry.ENTRY_POINT_GROUP),
        metadata.EntryPoint(name="missing", value="fake_semiseg_ep_missing", group=registry.ENTRY_POINT_GROUP),
    )
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    res = CliRunner().invoke(cli, ["list"])
    assert res.exit_code == 0, res.output
    err = flat(res.stderr)
    assert ("warning: plugin 'broken' (fake_semiseg_ep_broken) failed to load: plugin exploded on import"
            in err)
    assert "warning: plugin 'missing' (fake_semiseg_ep_missing) failed to load" in err
    assert "Traceback" not in res.output
    assert "supervised" in res.stdout and "crossmatch" in res.stdout
    assert registry._current_origin.current is None  # a failure does not leak its origin to later entries


def test_broken_file_plugin_is_an_error_of_the_plugin(tmp_path, clean_registry):
    bad = tmp_path / "badplug.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(Exception, match="boom"):  # an explicitly requested plugin fails loudly
        registry.load_plugin(str(bad))
    assert registry._current_origin.current is None


def test_running_a_definition_again_replaces_it(clean_registry):
    """A re-run notebook cell defines a new object with the same module and name: it replaces the old one;
    a different definition under a taken name is still refused."""
    code = ("from semiseg.registry import register_backbone\n"
            "@register_backbone('cell_net')\n"
            "def cell_net(in_channels=1, num_classes=2):\n    return None\n")
    first: dict = {"__name__": "__main__"}
    exec(code, first)
    again: dict = {"__name__": "__main__"}
    exec(code, again)
    assert registry.BACKBONES.get("cell_net") is again["cell_net"]
    other: dict = {"__name__": "another_module"}
    with pytest.raises(ConfigError, match="'cell_net' is registered twice"):
        exec(code, other)
