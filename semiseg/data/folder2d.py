"""Plain 2D image folders: PNG / JPG / BMP / TIFF images with class-index masks matched by file stem.

Layout (folder names are options)::

    root/images/<name>.png|jpg|tif    grey or RGB (alpha dropped); in_channels is taken from the first image
    root/masks/<name><mask_suffix>.png|tif   class indices per pixel
    root/unlabeled/<name>.*           optional extra images without masks

Masks: a mask whose only values are 0 and 255 (or just one of them) is binary and maps 255 -> 1; any
other mask is read as class indices as stored (palette PNGs give their palette indices).
``num_classes=None`` reads every mask once and takes the largest class id + 1. Intensity: 8-bit images are
divided by 255, any other depth is min-max scaled per image to [0, 1]. Splits (seed-free): validation = the
last ``n_val`` labeled images by sorted name (default 20%, rounded, at least 1), ``labeled`` (count or
fraction) takes the first of the rest, and the remaining labeled images plus ``unlabeled/`` are unlabeled.
Cases are single images, evaluated per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semiseg.data.base import Case, LazyItems, SegData
from semiseg.data.checks import (
    READ_ERRORS,
    broken_file,
    check_disjoint,
    check_label_values,
    check_nonempty,
    check_same_shape,
    content_sample,
    require_dir,
    require_root,
)
from semiseg.data.splits import holdout_tail, resolve_count, split_first
from semiseg.errors import ConfigError, DataError
from semiseg.registry import register_dataset

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TIFF = (".tif", ".tiff")
LAYOUT = "images/ and masks/ folders of PNG/JPG/TIFF files matched by name"


def _files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in EXTS:
            continue
        if p.stem in out:
            raise DataError(f"The files '{out[p.stem]}' and '{p}' share the name '{p.stem}'; "
                            f"rename or remove one.")
        out[p.stem] = p
    return out


def _channels_from_shape(shape: tuple[int, ...], path: Path) -> tuple[tuple[int, int], int]:
    """((H, W), C) for an array shape: (H, W), (H, W, C) with C <= 4, or (C, H, W) with C <= 4."""
    if len(shape) == 2:
        return (shape[0], shape[1]), 1
    if len(shape) == 3 and shape[2] <= 4:
        return (shape[0], shape[1]), shape[2]
    if len(shape) == 3 and shape[0] <= 4:
        return (shape[1], shape[2]), shape[0]
    raise DataError(f"The image '{path}' has shape {shape}, not (H, W) or (H, W, C); "
                    f"save it as a 2D image.")


def _grey(mode: str) -> bool:
    return mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;")


def header(path: Path) -> tuple[tuple[int, int], int]:
    """((H, W), channels) without decoding pixels."""
    try:
        if path.suffix.lower() in TIFF:
            import tifffile

            with tifffile.TiffFile(path) as t:
                return _channels_from_shape(tuple(t.pages[0].shape), path)
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            return (h, w), 1 if _grey(im.mode) else 3
    except DataError:
        raise
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


def _pixels(path: Path, as_image: bool) -> np.ndarray:
    """Raw pixel array; for images, PIL colour modes are reduced to grey or RGB (alpha dropped)."""
    try:
        if path.suffix.lower() in TIFF:
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as im:
            if as_image and im.mode in ("1", "LA"):
                im = im.convert("L")
            elif as_image and not _grey(im.mode) and im.mode != "RGB":
                im = im.convert("RGB")  # palette, RGBA, CMYK, ...
            im.load()
            return np.asarray(im)
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


def read_image(path: Path) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]."""
    a = _pixels(path, as_image=True)
    _channels_from_shape(a.shape, path)
    if a.ndim == 2:
        a = a[..., None]
    elif a.shape[2] > 4:  # (C, H, W) TIFF
        a = np.moveaxis(a, 0, -1)
    image = np.moveaxis(a, -1, 0)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    else:
        image = image.astype(np.float32)
        if not np.isfinite(image).all():
            raise DataError(f"The image in '{path}' contains NaN or Inf values; fix or remove the file.")
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.ascontiguousarray(image, dtype=np.float32)


def read_mask(path: Path) -> np.ndarray:
    """(H, W) int64 class indices, 0/255 binary masks mapped to 0/1."""
    m = _pixels(path, as_image=False)
    if m.ndim == 3:
        if not all(np.array_equal(m[..., 0], m[..., i]) for i in range(1, min(m.shape[-1], 3))):
            raise DataError(f"The mask '{path}' is a colour image; save it as a single-channel PNG of class "
                            f"indices.")
        m = m[..., 0]
    if m.dtype.kind == "f":
        if not np.isfinite(m).all() or (m != np.round(m)).any():
            raise DataError(f"The mask '{path}' holds non-integer values; save class indices as integers.")
    m = m.astype(np.int64)
    if m.size and m.max() == 255 and ((m == 0) | (m == 255)).all():
        m = (m == 255).astype(np.int64)
    return m


class _Loader:
    """Picklable: (image path, mask path | None) -> (image, mask) or image."""

    def __init__(self, with_label: bool) -> None:
        self.with_label = with_label

    def __call__(self, key: tuple[Path, Path | None]):
        img_path, mask_path = key
        image = read_image(img_path)
        if not self.with_label:
            return image
        return image, read_mask(mask_path)


def _cases(pairs: list[tuple[Path, Path]], num_classes: int):
    def load() -> list[Case]:
        out = []
        for ip, mp in pairs:
            label = read_mask(mp)
            check_label_values(label, num_classes, mp)
            out.append(Case(name=ip.stem, image=read_image(ip), label=label, meta={"file": str(ip)}))
        return out

    return load


@register_dataset("folder2d")
def folder2d(
    root: str | None = None,
    images: str = "images",
    masks: str = "masks",
    unlabeled: str = "unlabeled",
    labeled: float = 0.1,
    patch_size: tuple[int, ...] | None = (256, 256),
    num_classes: int | None = None,
    n_val: int | None = None,
    mask_suffix: str = "",
) -> SegData:
    """2D images and masks in folders; masks matched by stem (+ ``mask_suffix``), 0/255 masks read as 0/1."""
    root_p = require_root(root, "folder2d", LAYOUT)
    img_dir = require_dir(root_p / images, "image", f"put the images in {root_p / images} or pass "
                          f"images=NAME")
    mask_dir = require_dir(root_p / masks, "mask", f"put the masks in {root_p / masks} or pass masks=NAME")
    img_files, mask_files = _files(img_dir), _files(mask_dir)
    check_nonempty(img_files, "labeled", "folder2d", f"put PNG/JPG/TIFF images in {img_dir}")
    pairs: list[tuple[Path, Path]] = []
    for stem, ip in img_files.items():
        mp = mask_files.get(stem + mask_suffix)
        if mp is None:
            raise DataError(f"The image '{ip}' has no mask named '{stem}{mask_suffix}.*' in '{mask_dir}'; "
                            f"add the mask, set mask_suffix, or move the image to '{unlabeled}/'.")
        pairs.append((ip, mp))

    unl_dir = root_p / unlabeled
    extra = sorted(_files(unl_dir).values()) if unl_dir.is_dir() else []
    check_disjoint(img_files, [p.stem for p in extra], "labeled", "unlabeled", unl_dir)

    # Headers of every file: sizes and channel counts agree.
    in_ch = header(pairs[0][0])[1]
    for ip, mp in pairs:
        size, ch = header(ip)
        if ch != in_ch:
            raise DataError(f"The image '{ip}' has {ch} channel(s) but '{pairs[0][0]}' has {in_ch}; "
                            f"convert all images to the same colour mode.")
        check_same_shape(size, header(mp)[0], ip, mp)
    for p in extra:
        if header(p)[1] != in_ch:
            raise DataError(f"The image '{p}' has {header(p)[1]} channel(s) but the labeled images have "
                            f"{in_ch}; convert it to the same colour mode.")

    if num_classes is None:  # every mask is read once to find the largest class id
        num_classes = max(2, 1 + max(int(read_mask(mp).max()) for _, mp in pairs))
    elif num_classes < 2:
        raise ConfigError(f"num_classes={num_classes} must be at least 2 (background and one structure).")
    for ip, mp in content_sample(pairs):
        check_label_values(read_mask(mp), num_classes, mp)
        read_image(ip)

    train, val = holdout_tail(pairs, n_val, f"'{img_dir}'", key=lambda p: p[0].stem)
    n_lab = resolve_count(labeled, len(train), "images", f"'{img_dir}' (after the validation hold-out)")
    lab, rest = split_first(train, n_lab)
    unl_keys = [(ip, None) for ip, _ in rest] + [(p, None) for p in extra]
    return SegData(
        name="folder2d",
        dim=2,
        num_classes=int(num_classes),
        in_channels=int(in_ch),
        patch_size=tuple(int(p) for p in (patch_size or (256, 256))),
        labeled=LazyItems(lab, _Loader(True)),
        unlabeled=LazyItems(unl_keys, _Loader(False)),
        splits={"val": _cases(val, int(num_classes)), "train": _cases(lab, int(num_classes))},
        policy="medical2d",
        class_names=None,
        info={
            "evaluation": "per image",
            "labeled_images": [p[0].stem for p in lab],
            "val_images": [p[0].stem for p in val],
            "n_unlabeled": len(unl_keys),
            "mask_rule": "masks with only 0/255 map 255 -> 1; others are class indices",
        },
    )
