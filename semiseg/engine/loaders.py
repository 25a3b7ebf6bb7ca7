"""Loaders whose every batch is a pure function of (seed, stream, iteration).

Sample order comes from per-epoch permutations seeded by (seed, stream, epoch) and each sample's augmentation
from a seed derived from (seed, stream, iteration, position). So a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of workers, and with ``world`` processes each rank takes its slice
of the same global batch (2 processes x batch B see what 1 process x batch 2B sees). The labeled stream simply
cycles through its permutations: it is oversampled to whatever length the unlabeled stream runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from semiseg.augment.base import Policy
from semiseg.errors import DataError

STREAM_IDS = {"labeled": 1, "unlabeled": 2, "mix": 3}


def sample_seed(seed: int, stream: int, iteration: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, stream, iteration, position]).generate_state(1)[0])


class StepBatchSampler(Sampler):
    """Yields, for iterations [start, end), this rank's list of (index, sample_seed) keys."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: str, start: int, end: int,
                 rank: int = 0, world: int = 1) -> None:
        if n == 0:
            raise ValueError(f"the {stream} set is empty")
        self.n, self.b, self.seed, self.stream = n, batch_size, seed, STREAM_IDS[stream]
        self.start, self.end, self.rank, self.world = start, end, rank, world
        self._cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n))
        return self._cache[1]

    def keys(self, t: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.rank * self.b, (self.rank + 1) * self.b):
            epoch, k = divmod(t * self.b * self.world + j, self.n)
            out.append((int(self._perm(epoch)[k]), sample_seed(self.seed, self.stream, t, j)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for t in range(self.start, self.end):
            yield self.keys(t)

    def __len__(self) -> int:
        return self.end - self.start


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def check_unlabeled(image: np.ndarray, items: Sequence, index: int) -> None:
    """Unlabeled images are checked as they are read (a NaN would otherwise become 0 without a word)."""
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        keys = getattr(items, "keys", None)
        key = keys[index] if keys is not None else index
        n = int((~np.isfinite(image)).sum())
        raise DataError(f"Unlabeled item {key!r} contains {n} NaN or Inf values; fix or remove its file (the run "
                        f"was saved and continues with --resume once it is fixed).")


class ViewsDataset(Dataset):
    """Turns raw items into the views an algorithm asked for (see ``semiseg.algorithms.base.NEEDS``)."""

    def __init__(self, items: Sequence, policy: Policy, kind: str, strong: bool = False,
                 truth: Sequence | None = None) -> None:
        self.items, self.policy, self.kind, self.strong = items, policy, kind, strong
        self.truth = truth  # unlabeled items with labels: adds u_y / u_y_mix for the diagnostics

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        rng = np.random.default_rng(seed)
        if self.kind == "labeled":
            image, label = self.items[index]
            x, y = self.policy.weak(image, label, rng)
            return {"x": _tensor(x, torch.float32), "y": _tensor(y, torch.long)}
        sfx = "_mix" if self.kind == "mix" else ""
        out: dict[str, torch.Tensor] = {}
        pair = None
        if self.truth is not None:
            # the same random draws as weak_unlabeled, so every view is what it would be without the label
            pair = self.policy.weak_unlabeled_pair(*self.truth[index], rng)
        if pair is not None:
            w, out[f"u_y{sfx}"] = pair[0], _tensor(pair[1], torch.long)
        else:
            item = self.items[index]
            image = item[0] if isinstance(item, tuple) else item
            check_unlabeled(image, self.items, index)
            w = self.policy.weak_unlabeled(image, rng)
        out[f"u_w{sfx}"] = _tensor(w, torch.float32)
        if self.strong:
            out[f"u_s1{sfx}"] = _tensor(self.policy.strong(w, rng), torch.float32)
            out[f"u_s2{sfx}"] = _tensor(self.policy.strong(w, rng), torch.float32)
            if self.kind == "unlabeled":
                out["box1"] = _tensor(self.policy.cutmix_box(rng), torch.uint8)
                out["box2"] = _tensor(self.policy.cutmix_box(rng), torch.uint8)
        return out


def make_loader(items: Sequence, policy: Policy, kind: str, batch_size: int, seed: int, start: int, end: int,
                strong: bool, workers: int, rank: int = 0, world: int = 1, pin_memory: bool = False,
                truth: Sequence | None = None) -> DataLoader:
    ds = ViewsDataset(items, policy, kind, strong, truth)
    sampler = StepBatchSampler(len(items), batch_size, seed, kind, start, end, rank, world)
    # A private generator: creating a loader iterator draws a base seed, and drawing it from torch's global
    # generator would shift every later dropout mask after a resume.
    gen = torch.Generator().manual_seed(sample_seed(seed, STREAM_IDS[kind], start, -1 % 2**32))
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None, generator=gen)


class ZipLoaders:
    """Iterates the labeled, unlabeled and mix loaders in lock-step, merging their dicts into one batch."""

    def __init__(self, loaders: list[DataLoader]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        its = [iter(dl) for dl in self.loaders]
        while True:
            batch: dict[str, torch.Tensor] = {}
            try:
                for it in its:
                    batch.update(next(it))
            except StopIteration:
                return
            yield batch
