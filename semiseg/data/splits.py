"""Split helpers shared by the dataset factories: labeled counts, hold-out tails and list files.

Rules (the same for every dataset so that ``--labeled`` means one thing):

* ``labeled >= 1`` is a count and must be a whole number; ``0 < labeled < 1`` is a fraction of the available
  units, rounded *down* (5% of ACDC's 70 training patients is 3, the literature's "5%" split) and at least 1;
* the labeled subset is always the *first* N units in a fixed order (list-file order or sorted names), so a
  split never depends on a seed and a larger split contains every smaller one;
* validation hold-outs are the *last* ``n_val`` units by sorted name (default 20%, rounded, at least 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from semiseg.errors import ConfigError, DataError

T = TypeVar("T")

# Guards float noise in fraction * total (0.1 * 70 = 7.000000000000001, 0.29 * 100 = 28.999999999999996).
_EPS = 1e-6


def resolve_count(labeled: float, total: int, unit: str = "cases", what: str = "the dataset") -> int:
    """Turn ``labeled`` (count if >= 1, fraction if < 1) into a count in ``[1, total]``."""
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)) or not math.isfinite(labeled):
        raise ConfigError(f"labeled={labeled!r} is not a number; give a count (e.g. 8) or a fraction "
                          f"(e.g. 0.1).")
    if labeled <= 0:
        raise ConfigError(f"labeled={labeled} must be positive; give a count (e.g. 8) or a fraction "
                          f"(e.g. 0.1).")
    if labeled < 1:
        n = math.floor(labeled * total + _EPS)
        if n == 0:
            import warnings

            warnings.warn(f"labeled={labeled} of {total} {unit} rounds to none; using 1 labeled {unit[:-1]} "
                          f"(give a count to choose).", UserWarning, stacklevel=2)
            n = 1
    else:
        if abs(labeled - round(labeled)) > _EPS:
            raise ConfigError(
                f"labeled={labeled} is neither a whole count nor a fraction below 1; use e.g. 8 or 0.1."
            )
        n = int(round(labeled))
    if n > total:
        raise ConfigError(f"labeled={labeled} asks for {n} labeled {unit} but {what} has only {total}; "
                          f"use a count of at most {total} or a fraction.")
    return n


def split_first(items: Sequence[T], n: int) -> tuple[list[T], list[T]]:
    """First ``n`` items labeled, the rest unlabeled."""
    return list(items[:n]), list(items[n:])


def default_n_val(total: int) -> int:
    """20% of the labeled cases, rounded, at least 1."""
    return max(1, round(0.2 * total))


def holdout_tail(names: Sequence[T], n_val: int | None, what: str = "the dataset",
                 key: Callable[[T], Any] | None = None) -> tuple[list[T], list[T]]:
    """Sort ``names`` (by ``key``) and split into (train, val), the last ``n_val`` being validation."""
    names = sorted(names, key=key)
    if n_val is None:
        n_val = default_n_val(len(names))
    if isinstance(n_val, bool) or int(n_val) != n_val or n_val < 1:
        raise ConfigError(f"n_val={n_val!r} must be a whole number of at least 1.")
    n_val = int(n_val)
    if n_val >= len(names):
        raise ConfigError(f"n_val={n_val} leaves no training cases: {what} has only {len(names)} labeled "
                          f"cases; lower n_val.")
    return names[:-n_val], names[-n_val:]


def read_list(path: str | Path, what: str = "list file") -> list[str]:
    """Read a list file: one id per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The {what} '{path}' does not exist; restore it or point --data-root at the right "
                        f"folder.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"The {what} '{path}' cannot be read ({e}); replace it with a plain-text "
                        f"list.") from e
    return [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]


def unique_in_order(items: Sequence[T]) -> list[T]:
    """Items without repeats, first occurrence kept."""
    seen: set = set()
    out = []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


_ACDC_SLICE = re.compile(r"(?:^|/)(patient\d+_frame\d+)_slice_(\d+)(?:\.h5)?$")


def parse_acdc_slice(entry: str, source: str | Path = "split file") -> tuple[str, int]:
    """``data/slices/patient099_frame01_slice_3.h5`` -> ``("patient099_frame01", 2)`` (K counts from 1)."""
    m = _ACDC_SLICE.search(entry.strip().replace("\\", "/"))
    if m is None or int(m.group(2)) < 1:
        raise DataError(f"The line '{entry}' in '{source}' is not a slice path like "
                        f"'data/slices/patient<NNN>_frame<FF>_slice_<K>.h5' (K from 1); fix or remove it.")
    return m.group(1), int(m.group(2)) - 1


def acdc_patient(volume_id: str) -> str:
    """``patient099_frame01`` -> ``patient099``."""
    return volume_id.split("_frame")[0]
