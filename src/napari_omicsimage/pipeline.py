"""The headless pipeline: data → preprocessing → layout → images, in one call.

The CLI and the napari widgets both go through these functions, so they do
the same thing with the same defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .io import check_labels, reading_notes
from .layouts import Layout, make_layout, save_layout
from .outputs import write_output_dir
from .preprocess import PreprocessConfig, Preprocessor


@dataclass
class Imagified:
    """Images of samples with everything needed to trace pixels back to genes."""

    images: np.ndarray  # (N, C, H, W) float32
    samples: pd.Index
    labels: pd.Series | None
    layout: Layout
    preprocessor: Preprocessor
    #: the preprocessed matrix the images were rendered from (N × genes, [0, 1])
    expression: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def genes(self) -> np.ndarray:
        return self.preprocessor.genes_


def imagify(
    adata: ad.AnnData,
    method: str = "deepinsight",
    *,
    size: int | None = None,
    label_column: str | None = None,
    preprocess: PreprocessConfig | None = None,
    layout_params: dict | None = None,
    progress=None,
) -> Imagified:
    """Preprocess all samples, fit the layout on them and render every sample.

    This is for *looking* at data (napari, ``omicsimage render``): the layout is
    fitted on all samples given. Cross-validation fits on training folds only
    (see :mod:`napari_omicsimage.evaluation`).
    """
    labels = None
    if label_column is not None:
        check_labels(adata, label_column)
        labels = adata.obs[label_column].astype(str)
    preprocessor = Preprocessor(preprocess or PreprocessConfig())
    layout = make_layout(method, size=size, **(layout_params or {}))
    layout.check_memory(adata.n_obs)  # before any work: refuse images that cannot fit in memory
    x = preprocessor.fit_transform(adata)
    passed = preprocessor.qc_passed_
    render = {"progress": progress} if layout.has_gene_map else {}
    if passed.all():
        images = layout.fit_transform(x, preprocessor.genes_, **render)
    else:  # QC left samples out of the fit; every sample still gets its image
        images = layout.fit(x[passed], preprocessor.genes_).transform(x, **render)
    return Imagified(images, adata.obs_names.copy(), labels, layout, preprocessor, x,
                     render_notes(adata, preprocessor, layout))


def render_notes(adata: ad.AnnData, preprocessor: Preprocessor, layout: Layout) -> list[str]:
    """What ``omicsimage render`` prints and keeps in ``layout.json``: reading, scale, genes, layout."""
    notes = [*reading_notes(adata), *preprocessor.notes_,
             f"{adata.n_obs} samples × {len(preprocessor.genes_)} genes after preprocessing",
             layout.describe()]
    info = getattr(layout, "info_", {})
    if "n_unplaced" in info:
        notes.append(f"{info['n_unplaced']} of {info['n_unplaced'] + info['n_placed']} genes are not in "
                     "the annotation and were placed after the chromosome-ordered genes")
    if not layout.has_gene_map:
        notes.append("published RGB method: pixels are sample-embedding positions, not genes; "
                     "no gene can be traced from these images")
    return notes


def write_render_outputs(result: Imagified, out_dir: str | Path, *, overwrite: bool = False,
                         inputs=()) -> Path:
    """Write ``images.npy``, ``samples.csv``, the fitted layout and ``pixel_genes.csv``.

    Through :func:`napari_omicsimage.outputs.write_output_dir`: built under a
    temporary name and moved into place at the end, and with ``overwrite=True``
    only the files an earlier run of this tool wrote there are replaced.
    """
    def fill(tmp: Path) -> None:
        np.save(tmp / "images.npy", result.images.astype(np.float32, copy=False))
        write_render_files(tmp, samples=result.samples, labels=result.labels, layout=result.layout,
                           genes=result.genes, shape=result.images.shape, notes=result.notes)

    return write_output_dir(out_dir, fill, overwrite=overwrite, inputs=inputs)


def write_render_files(folder: Path, *, samples, labels, layout: Layout, genes, shape, notes) -> None:
    """Everything of ``omicsimage render`` but ``images.npy``: ``samples.csv``, the layout, ``pixel_genes.csv``
    and ``layout.json`` (the streaming render writes the images block by block beside them)."""
    frame = pd.DataFrame({"sample": samples})
    frame["label"] = labels.to_numpy() if labels is not None else ""
    frame.to_csv(folder / "samples.csv", index=False)
    if layout.has_gene_map:
        save_layout(layout, folder / "layout.npz")
        layout.pixel_map_.pixel_table().to_csv(folder / "pixel_genes.csv", index=False)
    else:
        pd.DataFrame(columns=["channel", "row", "col", "n_genes", "genes"]).to_csv(
            folder / "pixel_genes.csv", index=False)
    (folder / "layout.json").write_text(json.dumps(
        {"method": layout.method, "description": layout.describe(), "has_gene_map": layout.has_gene_map,
         "shape": list(shape), "genes": [str(g) for g in genes], "notes": list(notes)}, indent=2))
