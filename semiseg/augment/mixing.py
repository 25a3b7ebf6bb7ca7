"""Batched mixing ops on torch tensors, 2D and 3D alike (spatial shape ``S`` = ``(H, W)`` or ``(X, Y, Z)``).

* :func:`cutmix` / :func:`cutmix_target`: paste a partner batch inside per-sample CutMix boxes (UniMatch,
  FixMatch, CrossMatch);
* :func:`bcp_mask` / :func:`copy_paste`: BCP's one-box-per-iteration mask and the copy-paste it drives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _box_like(box: torch.Tensor, target: torch.Tensor, extra_dims: int) -> torch.Tensor:
    """``box`` (B, *S) as a boolean tensor broadcastable to ``target`` (B, [C,] *S) on its device."""
    expected = (target.shape[0], *target.shape[1 + extra_dims :])
    if tuple(box.shape) != tuple(expected):
        raise ValueError(
            f"CutMix box of shape {tuple(box.shape)} does not fit a tensor of shape {tuple(target.shape)}; "
            f"expected {tuple(expected)}."
        )
    mask = (box != 0).to(target.device)
    for _ in range(extra_dims):
        mask = mask.unsqueeze(1)
    return mask


def cutmix(x: torch.Tensor, x_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, *S) with ``x_mix`` pasted where ``box`` (B, *S, any dtype) is non-zero; a new tensor."""
    if x.shape != x_mix.shape:
        raise ValueError(f"cutmix: x {tuple(x.shape)} and x_mix {tuple(x_mix.shape)} differ in shape.")
    return torch.where(_box_like(box, x, extra_dims=1), x_mix, x)


def cutmix_target(t: torch.Tensor, t_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Targets or confidences ``t`` (B, *S) with ``t_mix`` taken inside ``box`` (B, *S); a new tensor.

    Probability maps (B, C, *S) are accepted too (the box is broadcast over C).
    """
    if t.shape != t_mix.shape:
        raise ValueError(f"cutmix_target: t {tuple(t.shape)} and t_mix {tuple(t_mix.shape)} differ in shape.")
    extra = t.dim() - box.dim()
    if extra not in (0, 1):
        raise ValueError(f"cutmix_target: box {tuple(box.shape)} does not fit targets {tuple(t.shape)}.")
    return torch.where(_box_like(box, t, extra_dims=extra), t_mix, t)


def bcp_mask(
    spatial_shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    ratio: float = 2 / 3,
) -> torch.Tensor:
    """BCP's copy-paste mask: float ones of ``spatial_shape`` with a zero box, shared by the whole batch.

    The box is ``int(size * 2/3)`` along each axis (ACDC 256 -> 170; LA 112x112x80 -> 74x74x53) and its corner
    is uniform in ``[0, size - box)`` per axis, as BCP's ``generate_mask`` / ``context_mask``. The draws use
    ``generator`` (the global torch generator when None).
    """
    shape = tuple(int(s) for s in spatial_shape)
    # The small epsilon keeps exact products such as 3 * 2/3 from rounding down to 1.
    sizes = [min(int(s * ratio + 1e-9), s) for s in shape]
    draw_device = generator.device if generator is not None else "cpu"
    corner = [
        int(torch.randint(0, max(s - b, 1), (1,), generator=generator, device=draw_device).item())
        for s, b in zip(shape, sizes)
    ]
    mask = torch.ones(shape, dtype=torch.float32, device=device)
    mask[tuple(slice(c, c + b) for c, b in zip(corner, sizes))] = 0
    return mask


def copy_paste(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a * mask + b * (1 - mask)``: ``a`` where mask is 1, ``b`` where it is 0 (BCP's mix).

    ``mask`` follows torch broadcasting: a spatial mask (*S) (as :func:`bcp_mask` returns) applies to
    (B, *S) and (B, C, *S) alike; per-sample masks are given as (B, *S) for (B, *S) tensors or (B, 1, *S)
    for (B, C, *S). Integer tensors (labels) keep their dtype, the mask then being read as 0/1.
    """
    mask = mask.to(a.device)
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return a * mask + b * (1 - mask)
    return torch.where(mask != 0, a, b)
