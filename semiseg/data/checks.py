"""Input validation run by every dataset factory before training, and the safe readers it relies on.

Each problem stops with one :class:`DataError` sentence naming the file and the fix. The checks are meant to
be fast: every file's header (h5 dataset shapes, NIfTI header, image size) is read, but file *contents* (label
values, NaN/Inf in images, truncated data) are read only for the labeled files, all of them when there are
fewer than :data:`CONTENT_CHECK_LIMIT`, otherwise that many spread evenly over the list. Files that are not
checked up front are still read through the same readers, so a broken one fails with the same sentence when
it is loaded.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence, Sized
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from semiseg.errors import ConfigError, DataError

T = TypeVar("T")

CONTENT_CHECK_LIMIT = 300

# Errors that readers raise on broken, truncated or foreign files (h5py raises OSError/KeyError,
# nibabel ImageFileError (a ValueError) or EOFError/zlib.error on truncated gzip, PIL OSError/SyntaxError).
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, KeyError, ValueError, EOFError, zlib.error,
                                                 SyntaxError, RuntimeError, IndexError, TypeError)


# --------------------------------------------------------------------------- paths

def require_root(root: str | os.PathLike | None, dataset: str, layout: str) -> Path:
    """The dataset root as a Path; a missing root is a flag problem, a non-existent one a data problem."""
    if root is None or str(root) == "":
        raise ConfigError(f"Dataset '{dataset}' needs a root folder; "
                          f"pass --data-root PATH to a folder with {layout}.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"The {dataset} root '{path}' does not exist or is not a folder; "
                        f"pass --data-root PATH to a folder with {layout}.")
    return path


def require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise DataError(f"The {what} folder '{path}' is missing; {fix}.")
    return path


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"The {what} '{path}' is missing; {fix}.")
    return path


# --------------------------------------------------------------------------- h5

def broken_file(path: Path | str, e: BaseException, fix: str = "re-create or re-download it") -> DataError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DataError(f"The file '{path}' cannot be read ({detail}); it is probably truncated or corrupt, "
                     f"{fix}.")


def h5_shapes(path: Path, keys: Sequence[str] = ("image", "label")) -> dict[str, tuple[int, ...]]:
    """Shapes of the named datasets in an h5 file, reading headers only."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"The file '{path}' has no '{missing[0]}' dataset (it has: "
                                f"{', '.join(f.keys()) or 'nothing'}); re-create it with {', '.join(keys)}.")
            return {k: tuple(int(s) for s in f[k].shape) for k in keys}
    except DataError:
        raise
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


def h5_attr(path: Path, name: str, key: str | None = None) -> Any:
    """An attribute of the file (or of dataset ``key``), None when absent."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            obj = f[key] if key is not None else f
            return obj.attrs[name] if name in obj.attrs else None
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


def read_h5(path: Path, keys: Sequence[str] = ("image", "label")) -> list[np.ndarray]:
    """Whole datasets from an h5 file; any read failure becomes a DataError naming the file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return [f[k][()] for k in keys]
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


# --------------------------------------------------------------------------- contents

def check_same_shape(shape_a: Sequence[int], shape_b: Sequence[int], path_a: Path | str,
                     path_b: Path | str | None = None) -> None:
    if tuple(shape_a) != tuple(shape_b):
        same = path_b is None or str(path_b) == str(path_a)
        where = f"'{path_a}'" if same else f"'{path_a}' and '{path_b}'"
        raise DataError(f"Image and label shapes differ in {where} ({tuple(shape_a)} vs {tuple(shape_b)}); "
                        f"re-export the label on the image grid.")


def check_same_affine(affine_a: np.ndarray | None, affine_b: np.ndarray, path_a: Path | str,
                      path_b: Path | str) -> None:
    """Two files of one case must sit at the same place in the world (their affines agree to 0.001 mm), or a
    label would be learned and written shifted or flipped against its image."""
    if affine_a is None:
        return
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    if not np.allclose(a[:3], b[:3], rtol=0, atol=1e-3):
        worst = float(np.abs(a[:3] - b[:3]).max())
        raise DataError(f"The affines of '{path_a}' and '{path_b}' disagree (by up to {worst:.4g} mm), so they do "
                        f"not cover the same voxels in space; re-export '{path_b}' on the grid of '{path_a}'.")


def check_label_values(label: np.ndarray, num_classes: int, path: Path | str, fix: str | None = None) -> None:
    """Labels must be whole numbers in ``[0, num_classes)``."""
    if label.size == 0:
        raise DataError(f"The label in '{path}' is empty; re-export it.")
    if label.dtype.kind == "f":
        if not np.isfinite(label).all() or (label != np.round(label)).any():
            raise DataError(f"The label in '{path}' holds non-integer values; "
                            f"save class indices 0..{num_classes - 1}.")
    lo, hi = label.min(), label.max()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        fix = fix or f"store class indices 0..{num_classes - 1} or raise num_classes"
        raise DataError(f"The label in '{path}' contains value {bad:g} but the dataset has {num_classes} "
                        f"classes (0..{num_classes - 1}); {fix}.")


def check_finite(image: np.ndarray, path: Path | str) -> None:
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        n = int((~np.isfinite(image)).sum())
        raise DataError(f"The image in '{path}' contains {n} NaN or Inf values; fix or remove the file.")


def check_nonempty(items: Sized, split: str, dataset: str, fix: str) -> None:
    if len(items) == 0:
        raise DataError(f"The {split} split of dataset '{dataset}' is empty; {fix}.")


def check_disjoint(a: Iterable[Hashable], b: Iterable[Hashable], name_a: str, name_b: str,
                   source: Path | str) -> None:
    """Two splits must not share items (a labeled item used as unlabeled or as a test case leaks labels)."""
    both = sorted(set(a) & set(b), key=str)
    if both:
        more = f" and {len(both) - 1} more" if len(both) > 1 else ""
        raise DataError(f"The {name_a} and {name_b} splits from '{source}' overlap ('{both[0]}'{more}); "
                        f"remove the shared entries from one of them.")


def content_sample(items: Sequence[T], cap: int = CONTENT_CHECK_LIMIT) -> list[T]:
    """All items when fewer than ``cap``, else ``cap`` of them spread evenly (first and last included)."""
    if len(items) < cap:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, cap).round().astype(int))
    return [items[i] for i in idx]


# --------------------------------------------------------------------------- model/dataset fit

def check_backbone_dim(data_dim: int, backbone_dim: int, backbone_name: str, dataset_name: str) -> None:
    """A 2D backbone cannot train on a 3D dataset and vice versa."""
    if int(data_dim) == int(backbone_dim):
        return
    if backbone_dim == 2:
        hint = "use --backbone vnet or unet3d, or a 2D dataset"
    else:
        hint = "use --backbone unet or smp, or a 3D dataset"
    raise ConfigError(f"'{backbone_name}' is a {backbone_dim}D backbone but dataset '{dataset_name}' is "
                      f"{data_dim}D; {hint}.")


# --------------------------------------------------------------------------- caching

class ProcessLRU:
    """A small least-recently-used cache that belongs to one process.

    Data-loader workers each get their own (the cache is dropped when pickled and when the process id changes
    after a fork), so no open file handle is ever shared between processes.
    """

    def __init__(self, maxsize: int, on_evict: Callable[[Any], None] | None = None) -> None:
        self.maxsize = int(maxsize)
        self.on_evict = on_evict
        self._pid = os.getpid()
        self._store: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use or close
            self._store = OrderedDict()
            self._pid = os.getpid()
        if self.maxsize <= 0:
            return make()
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        value = make()
        self._store[key] = value
        while len(self._store) > self.maxsize:
            _, old = self._store.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)
        return value

    def clear(self) -> None:
        while self._store:
            _, old = self._store.popitem(last=False)
            if self.on_evict is not None and self._pid == os.getpid():
                self.on_evict(old)

    def __len__(self) -> int:
        return len(self._store)

    def __getstate__(self) -> dict:
        return {"maxsize": self.maxsize, "on_evict": self.on_evict}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["maxsize"], state["on_evict"])
