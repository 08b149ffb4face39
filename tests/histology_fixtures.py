"""Tiny generated sections with a known image → expression link, for the histology tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd

#: pixels per array step of the generated legacy-ST sections (200 µm → 5 µm/px)
STEP_PX = 40
GRID = 8


def make_st_section(folder: Path, seed: int, *, grid: int = GRID, n_noise_genes: int = 30) -> Path:
    """A legacy-ST folder whose spots hold more or fewer dark purple 'nuclei'.

    ``NUC`` counts rise with the nuclei density of the spot's patch, ``EOS``
    counts fall with it, the other genes are noise: a model that sees the
    image can predict NUC and EOS, one that does not cannot.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    side = STEP_PX * (grid + 3)  # glass around the tissue, as on a real slide
    image = np.full((side, side, 3), 245, dtype=np.uint8)
    tissue = slice(STEP_PX // 2, STEP_PX * grid + STEP_PX // 2)
    image[tissue, tissue] = (235, 180, 215)  # eosin pink
    image += rng.integers(0, 10, size=image.shape, dtype=np.uint8)
    rows, counts = [], []
    for ix in range(1, grid + 1):
        for iy in range(1, grid + 1):
            density = rng.uniform(0, 1)
            cx, cy = ix * STEP_PX, iy * STEP_PX
            n_nuclei = int(2 + density * 40)
            for _ in range(n_nuclei):
                x = int(cx + rng.integers(-STEP_PX // 2 + 2, STEP_PX // 2 - 2))
                y = int(cy + rng.integers(-STEP_PX // 2 + 2, STEP_PX // 2 - 2))
                image[y - 1:y + 2, x - 1:x + 2] = (70, 40, 130)  # haematoxylin purple
            rows.append({"x": ix, "y": iy, "new_x": ix, "new_y": iy, "pixel_x": float(cx), "pixel_y": float(cy),
                         "selected": 1})
            total = rng.poisson(2000)
            nuc = rng.poisson(5 + 200 * density)
            eos = rng.poisson(5 + 200 * (1 - density))
            counts.append([nuc, eos, *rng.poisson(30, size=n_noise_genes), total])
    Image.fromarray(image).save(folder / "he_image.jpg", quality=92)
    pd.DataFrame(rows).to_csv(folder / "spot_selection.tsv", sep="\t", index=False)
    ids = [f"{r['x']}x{r['y']}" for r in rows]
    genes = ["NUC", "EOS", *[f"NOISE{i}" for i in range(n_noise_genes)], "HOUSE"]
    frame = pd.DataFrame(counts, index=ids, columns=genes)
    with gzip.open(folder / "counts_spots_by_genes.tsv.gz", "wt") as stream:
        frame.to_csv(stream, sep="\t")
    return folder


def make_pyramidal_tif(path: Path, *, side: int = 512, um_per_px: float = 0.5, seed: int = 0) -> np.ndarray:
    """A tiled RGB TIFF with two reduced levels (sub-IFDs) and its resolution tags; returns level 0."""
    import tifffile

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
    per_cm = 1e4 / um_per_px
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
        tif.write(data, subifds=2, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", **options)
        tif.write(data[::2, ::2], subfiletype=1, **options)
        tif.write(data[::4, ::4], subfiletype=1, **options)
    return data
