"""Name -> factory tables, in the style of timm's registry.

Every table maps a name to a plain callable. ``create_*`` validates keyword arguments against the
factory's signature so that a typo in a flag fails with a sentence instead of a ``TypeError`` deep inside.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from semiseg.errors import ConfigError, SemisegError

ENTRY_POINT_GROUP = "semiseg.plugins"


class Registry:
    """One table of named factories (algorithms, backbones, datasets, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str | None = None, *, origin: str = "semiseg") -> Callable:
        def deco(fn: Callable) -> Callable:
            key = name or getattr(fn, "name", None) or fn.__name__
            old = self._table.get(key)
            # the same definition run again (a re-run notebook cell, a plugin file loaded twice) replaces itself
            same = old is not None and (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == (
                getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
            if old is not None and old is not fn and not same:
                raise ConfigError(f"{self.kind} '{key}' is registered twice (by {getattr(old, '__module__', '?')} and "
                                  f"{getattr(fn, '__module__', '?')}); rename one of them.")
            self._table[key] = fn
            self._origin[key] = _current_origin.get(origin)
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        _ensure_builtins()
        if name not in self._table:
            close = difflib.get_close_matches(name, list(self._table), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"Unknown {self.kind} '{name}'.{hint} Known: {', '.join(sorted(self._table))} "
                f"(see `semiseg list`)."
            )
        return self._table[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        fn = self.get(name)
        check_kwargs(fn, kwargs, f"{self.kind} '{name}'")
        from semiseg.validation import check_call

        check_call(fn, kwargs, f"{self.kind} '{name}'")  # threshold=high, width="wide": one sentence
        return fn(**kwargs)

    def names(self) -> list[str]:
        _ensure_builtins()
        return sorted(self._table)

    def origin(self, name: str) -> str:
        return self._origin.get(name, "semiseg")

    def __contains__(self, name: str) -> bool:
        _ensure_builtins()
        return name in self._table


def accepted_kwargs(fn: Callable) -> tuple[set[str], bool]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    names = {p.name for p in sig.parameters.values() if p.name != "self"
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def check_kwargs(fn: Callable, kwargs: dict[str, Any], what: str) -> None:
    names, var_kw = accepted_kwargs(fn)
    if var_kw:
        return
    bad = [k for k in kwargs if k not in names]
    if bad:
        close = {b: difflib.get_close_matches(b, sorted(names), n=1) for b in bad}
        parts = [f"'{b}'" + (f" (did you mean '{close[b][0]}'?)" if close[b] else "") for b in bad]
        raise ConfigError(
            f"{what} does not take option {', '.join(parts)}; it takes: {', '.join(sorted(names)) or 'none'}."
        )


class _Origin:
    """Which plugin is being imported, so `semiseg list` can say where each entry came from."""

    def __init__(self) -> None:
        self.current: str | None = None

    def get(self, default: str) -> str:
        return self.current or default


_current_origin = _Origin()

ALGORITHMS = Registry("algorithm")
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")
PRESETS = Registry("preset")
PERTURBATIONS = Registry("feature perturbation")
POLICIES = Registry("augmentation policy")

TABLES = {
    "algorithms": ALGORITHMS,
    "backbones": BACKBONES,
    "datasets": DATASETS,
    "perturbations": PERTURBATIONS,
    "policies": POLICIES,
    "presets": PRESETS,
}

register_algorithm = ALGORITHMS.register
register_backbone = BACKBONES.register
register_dataset = DATASETS.register
register_preset = PRESETS.register
register_perturbation = PERTURBATIONS.register
register_policy = POLICIES.register

_builtins_loaded = False
_loaded_plugins: list[str] = []


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    # Importing these modules runs their @register_* decorators.
    for mod in ("semiseg.backbones", "semiseg.data", "semiseg.augment", "semiseg.algorithms", "semiseg.presets"):
        importlib.import_module(mod)
    load_entry_point_plugins()


def load_entry_point_plugins() -> list[str]:
    """Import every module advertised under the ``semiseg.plugins`` entry-point group."""
    found = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _loaded_plugins:
            continue
        _current_origin.current = f"plugin:{ep.name}"
        try:
            obj = ep.load()
            if callable(obj) and not inspect.ismodule(obj):
                obj()
        except Exception as e:  # a broken plugin must not break the whole CLI
            print(f"warning: plugin '{ep.name}' ({ep.value}) failed to load: {e}", file=sys.stderr)
        finally:
            _current_origin.current = None
        _loaded_plugins.append(ep.value)
        found.append(ep.name)
    return found


def load_plugin(spec: str) -> None:
    """Load a plugin given as a path to a ``.py`` file or an importable module name."""
    _ensure_builtins()
    if spec in _loaded_plugins:
        return
    path = Path(spec)
    _current_origin.current = f"plugin:{path.name if spec.endswith('.py') else spec}"
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise ConfigError(f"Plugin file '{spec}' does not exist; pass a path to a .py file or a module name.")
            mod_name = f"semiseg_plugin_{path.stem}"
            s = importlib.util.spec_from_file_location(mod_name, path)
            assert s is not None and s.loader is not None
            module = importlib.util.module_from_spec(s)
            sys.modules[mod_name] = module
            try:
                s.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as e:
                raise ConfigError(
                    f"Plugin module '{spec}' cannot be imported ({e}); install it or pass a path to a .py file."
                ) from e
    except SemisegError:
        raise
    except Exception as e:  # the plugin's own code failed: one sentence, the traceback with --debug
        raise ConfigError(
            f"Plugin '{spec}' failed to load ({type(e).__name__}: {e}); fix it, or run with --debug to see where."
        ) from e
    finally:
        _current_origin.current = None
    _loaded_plugins.append(spec)


def require_plugins(names: list[str] | tuple[str, ...], source: str) -> None:
    """Refuse, in one sentence, a stored config or checkpoint that names plugins the user did not load: a
    plugin is code, and semiseg runs code only when the user names it on the command line (or in the API)."""
    _ensure_builtins()
    missing = [n for n in names if n not in _loaded_plugins]
    if missing:
        raise ConfigError(f"{source} names plugin(s) {', '.join(missing)}, which semiseg does not load on its own "
                          f"(a plugin runs code); if you trust it, pass --plugin {missing[0]}.")


def loaded_plugins() -> list[str]:
    _ensure_builtins()
    return list(_loaded_plugins)


def create_algorithm(name: str, **kwargs: Any) -> Any:
    return ALGORITHMS.create(name, **kwargs)


def create_backbone(name: str, **kwargs: Any) -> Any:
    return BACKBONES.create(name, **kwargs)


def create_dataset(name: str, **kwargs: Any) -> Any:
    return DATASETS.create(name, **kwargs)


def list_models() -> list[str]:
    return BACKBONES.names()
