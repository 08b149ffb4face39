"""``omicsimage render`` of a backed (atlas) ``.h5ad``: images written block by block.

The preprocessing is fitted in one streaming pass over all cells
(:func:`~napari_omicsimage.streaming.fit.fit_preprocessor`), the gene layout
on a stratified subsample of at most ``layout_cells`` cells (as for
training), and each block of cells is preprocessed, rendered and appended to
``images.npy``; the other files are those of the in-memory render
(:func:`napari_omicsimage.pipeline.write_render_files`).  Memory: one block of
cells and the layout's subsample; ``images.npy`` (N × C × H × W float32) goes
to disk, not memory, so the in-memory path's "would not fit in memory" check
does not apply.  With ``layout_cells`` ≥ the number of cells the files equal
the in-memory render's.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from ..io import check_labels
from ..outputs import NpyRows, write_output_dir
from ..pipeline import render_notes, write_render_files
from ..preprocess import PreprocessConfig
from ..progress import ProgressEvent
from .cells import iter_row_blocks
from .fit import DEFAULT_LAYOUT_CELLS, fit_layout_on_subsample, fit_preprocessor, prepare_block


def render_streaming(adata: ad.AnnData, layout_spec: dict, out, *, label_column: str | None = None,
                     preprocess: PreprocessConfig | None = None, layout_cells: int = DEFAULT_LAYOUT_CELLS,
                     seed: int = 0, overwrite: bool = False, inputs=(), progress=None) -> tuple[tuple, list[str]]:
    """Render every cell of ``adata`` into the folder ``out``; returns ``(images shape, notes)``.

    ``progress(ProgressEvent("render", batch=cells done − 1, n_batches=cells))``
    hears every block.
    """
    labels = None
    if label_column is not None:
        check_labels(adata, label_column)
        labels = adata.obs[label_column].astype(str)
    rows = np.arange(adata.n_obs)
    preprocessor = fit_preprocessor(adata, rows, preprocess or PreprocessConfig())
    codes = None if labels is None else labels.to_numpy()
    layout, subsample = fit_layout_on_subsample(adata, rows, preprocessor, layout_spec, labels=codes,
                                                layout_cells=int(layout_cells), seed=int(seed))
    shape = (adata.n_obs, layout.n_channels, *layout.pixel_map_.shape)
    notes = render_notes(adata, preprocessor, layout)
    if len(subsample) < adata.n_obs:
        notes.append(f"streaming: the layout was fitted on a stratified subsample of {len(subsample):,} of the "
                     f"{adata.n_obs:,} cells (--layout-cells); preprocessing statistics on all of them")

    def fill(tmp) -> None:
        images = NpyRows(tmp / "images.npy", shape)
        for part, block in iter_row_blocks(adata, rows):
            images.append(layout.transform(prepare_block(adata, part, block, preprocessor)))
            if progress is not None:
                progress(ProgressEvent("render", batch=images.rows - 1, n_batches=adata.n_obs))
        images.close()
        write_render_files(tmp, samples=adata.obs_names, labels=labels, layout=layout, genes=preprocessor.genes_,
                           shape=shape, notes=notes)

    write_output_dir(out, fill, overwrite=overwrite, inputs=inputs)
    return shape, notes
