"""Values of the wrong type, from YAML, ``--opt`` or the Python API, refused in one sentence before any work.

The expected type is read from the annotation (``int``, ``float | None``, ``list[int]``, ``bool``...). An int is
a float, a bool is neither an int nor a float, and strings are never converted: ``nesterov: "no"`` is refused,
not taken as true.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from semiseg.errors import ConfigError

_SIMPLE = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _matches(value: Any, annotation: str) -> bool | None:
    """True/False when ``annotation`` is one this checker understands, None when it does not."""
    verdicts = []
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None":
            verdicts.append(value is None)
        elif part in _SIMPLE:
            ok = isinstance(value, _SIMPLE[part]) and not (part in ("int", "float") and isinstance(value, bool))
            verdicts.append(ok)
        elif part.startswith(("list", "tuple", "Sequence")):
            inner = part[part.find("[") + 1:part.rfind("]")] if "[" in part else "Any"
            inner = inner.split(",")[0].strip()
            ok = isinstance(value, (list, tuple))
            if ok and inner in _SIMPLE:
                ok = all(_matches(v, inner) for v in value)
            verdicts.append(ok)
        elif part.startswith(("dict", "Mapping")):
            verdicts.append(isinstance(value, dict))
        else:
            return None  # Any, a class, a callable...: not ours to judge
    return any(verdicts)


def check_value(name: str, value: Any, annotation: str | None, what: str) -> None:
    if not annotation:
        return
    if _matches(value, annotation) is False:
        raise ConfigError(f"{what}: '{name}' must be {annotation.replace('|', 'or')}, got {value!r} "
                          f"({type(value).__name__}).")


def check_call(fn: Callable, kwargs: dict[str, Any], what: str) -> None:
    """The types of ``kwargs`` against the annotations of ``fn`` (a function or a class's ``__init__``)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    for k, v in kwargs.items():
        p = params.get(k)
        if p is not None and p.annotation is not inspect.Parameter.empty:
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", None)
            check_value(k, v, ann, what)
