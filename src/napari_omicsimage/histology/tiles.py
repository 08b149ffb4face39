"""Patches at a physical size, tissue detection, tile grids and ISG's Shannon selection.

A patch is the square of ``patch_um`` µm (default 112 µm, as HEST) centred on
a spot, resampled to ``out_px`` pixels, so patches from slides scanned at
different resolutions show the same tissue area at the same pixel size.

Shannon selection (ISG, "I can see your gene expression"): the Shannon
entropy of a patch's grey-level histogram measures how much texture it holds;
glass, folds and blur score low.  Keeping the patches above a threshold, or
the top fraction, drops regions with little to learn from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import OmicsInputError
from .slide import Slide

DEFAULT_PATCH_UM = 112.0
#: 112 µm at 0.5 µm/px, HEST's patch (224 px, the CNNs' native input)
DEFAULT_PATCH_PX = 224


def patch_side_px(patch_um: float, um_per_px: float) -> int:
    return max(2, int(round(patch_um / um_per_px)))


def iter_patches(slide: Slide, centres: np.ndarray, *, side_px: int, out_px: int = DEFAULT_PATCH_PX,
                 batch_size: int = 32) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(rows, patches)`` in batches; ``patches`` is ``(b, out_px, out_px, 3)`` uint8.

    Each patch is read at level 0 (``side_px`` square around the centre) and
    resampled with PIL's area-averaging ``reduce``+bilinear, so only one batch
    is ever in memory.
    """
    from PIL import Image

    centres = np.asarray(centres, dtype=np.float64)
    half = side_px / 2.0
    for start in range(0, len(centres), batch_size):
        stop = min(start + batch_size, len(centres))
        batch = np.empty((stop - start, out_px, out_px, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(centres[start:stop]):
            region = slide.read_region(int(round(x - half)), int(round(y - half)), side_px, side_px)
            if side_px != out_px:
                region = np.asarray(Image.fromarray(region).resize((out_px, out_px), Image.Resampling.BILINEAR,
                                                                   reducing_gap=2.0))
            batch[i] = region
        yield slice(start, stop), batch


def grey(patches: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of uint8 RGB patches, as uint8 (what the Shannon histogram counts)."""
    p = np.asarray(patches, dtype=np.float32)
    return np.clip(p[..., 0] * 0.299 + p[..., 1] * 0.587 + p[..., 2] * 0.114, 0, 255).astype(np.uint8)


def shannon_entropy(patches: np.ndarray, bins: int = 256) -> np.ndarray:
    """Shannon entropy (bits) of each patch's grey-level histogram: ``(b,)``."""
    g = grey(patches).reshape(len(patches), -1)
    out = np.empty(len(g))
    for i, row in enumerate(g):
        counts = np.bincount(row >> (8 - int(np.log2(bins))), minlength=bins).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out[i] = float(-(p * np.log2(p)).sum())
    return out


@dataclass
class Selection:
    """Which patches Shannon selection kept, and why."""

    keep: np.ndarray  # bool
    entropy: np.ndarray
    threshold: float
    rule: str

    def describe(self) -> str:
        n, k = len(self.keep), int(self.keep.sum())
        return (f"Shannon selection ({self.rule}): kept {k} of {n} patches ({k / max(n, 1):.0%}), "
                f"entropy ≥ {self.threshold:.2f} bits; entropies {np.min(self.entropy, initial=0):.2f}–"
                f"{np.max(self.entropy, initial=0):.2f}")


def shannon_select(entropy: np.ndarray, *, min_entropy: float | None = None,
                   keep_fraction: float | None = None) -> Selection:
    """Keep patches with entropy ≥ ``min_entropy``, or the ``keep_fraction`` with the highest entropy."""
    entropy = np.asarray(entropy, dtype=np.float64)
    if min_entropy is not None and keep_fraction is not None:
        raise OmicsInputError("give a Shannon threshold or a fraction to keep, not both.")
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise OmicsInputError(f"the fraction to keep must be in (0, 1], got {keep_fraction}.")
        k = max(1, int(np.ceil(keep_fraction * len(entropy))))
        threshold = float(np.sort(entropy)[::-1][k - 1]) if len(entropy) else 0.0
        keep = np.zeros(len(entropy), dtype=bool)
        keep[np.argsort(-entropy, kind="stable")[:k]] = True
        return Selection(keep, entropy, threshold, f"top {keep_fraction:.0%}")
    if min_entropy is not None:
        return Selection(entropy >= min_entropy, entropy, float(min_entropy), f"threshold {min_entropy:g} bits")
    return Selection(np.ones(len(entropy), dtype=bool), entropy, float(np.min(entropy, initial=0)), "all kept")


# ---------------------------------------------------------------- tissue
def tissue_mask(slide: Slide, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Tissue on a thumbnail (Otsu threshold of HSV saturation); returns ``(mask, thumbnail scale)``."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import binary_closing, disk, remove_small_objects

    thumb, scale = slide.thumbnail(max_side)
    saturation = rgb2hsv(thumb)[..., 1]
    if np.ptp(saturation) < 1e-6:
        return np.zeros(saturation.shape, dtype=bool), scale
    mask = saturation > threshold_otsu(saturation)
    mask = binary_closing(mask, disk(2))
    mask = remove_small_objects(mask, max(16, mask.size // 10_000))
    return mask, scale


def tile_grid(slide: Slide, *, um_per_px: float, tile_um: float = DEFAULT_PATCH_UM,
              min_tissue: float = 0.5) -> tuple[pd.DataFrame, str]:
    """Centres of a ``tile_um`` grid over the tissue: a spot table for slides without spots."""
    mask, scale = tissue_mask(slide)
    side = tile_um / um_per_px
    h, w = slide.shape
    xs = np.arange(side / 2, w - side / 2 + 1e-9, side)
    ys = np.arange(side / 2, h - side / 2 + 1e-9, side)
    rows = []
    for y in ys:
        for x in xs:
            x0, x1 = int((x - side / 2) * scale), max(int((x + side / 2) * scale), int((x - side / 2) * scale) + 1)
            y0, y1 = int((y - side / 2) * scale), max(int((y + side / 2) * scale), int((y - side / 2) * scale) + 1)
            if mask[y0:y1, x0:x1].mean() >= min_tissue:
                rows.append((x, y))
    if not rows:
        raise OmicsInputError(f"{slide.path.name}: no tissue found (Otsu on saturation); check the image.")
    frame = pd.DataFrame(rows, columns=["x", "y"])
    frame.index = pd.Index([f"tile_{int(round(x))}_{int(round(y))}" for x, y in rows])
    note = (f"tile grid: {len(frame)} tiles of {tile_um:g} µm over the tissue "
            f"({mask.mean():.0%} of the slide; Otsu threshold on saturation)")
    return frame, note
