"""Synthetic single-cell counts written to ``.h5ad`` in chunks (benchmarks and tests).

The file is written block by block straight into anndata's on-disk CSR
layout (``X/data``, ``X/indices``, ``X/indptr`` grown with h5py), so a
10⁶-cell file never exists in memory.

The model, per cell ``i`` of type ``t``:

* a size factor ``s_i ~ Gamma(4, 1/4)`` (mean 1), which makes counts
  overdispersed like a negative binomial;
* which genes are detected: ``Poisson(s_i · Σ_g p_tg)`` draws of genes with
  probabilities ``p_tg`` (duplicates dropped), where ``p_g`` is log-normal with
  mean ``density`` and the ``markers`` genes of type ``t`` are 6× likelier
  (+0.1) in cells of that type;
* the count of a detected gene: ``1 + Poisson(s_i · μ_tg)``, ``μ`` 0.5
  (marker genes in their own type: 3; 1 % highly expressed genes, detected
  in 90 % of cells: 30).

At the defaults 2–5 % of the matrix is non-zero (3 % for ``density=0.03``).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def synthetic_counts_h5ad(path: str | Path, n_cells: int, n_genes: int = 20_000, *, n_types: int = 10,
                          density: float = 0.03, markers: int = 50, seed: int = 0, cell_seed: int | None = None,
                          chunk_cells: int = 10_000, label_column: str = "cell_type",
                          name_prefix: str = "cell") -> Path:
    """Write ``n_cells`` × ``n_genes`` synthetic counts with labels in ``obs[label_column]``; returns ``path``.

    ``seed`` fixes the genes (detection, markers, means); ``cell_seed`` (default:
    ``seed``) the cells, so two files with one ``seed`` and two ``cell_seed``
    are a training set and a held-out set of the same cell types.
    """
    import h5py

    path = Path(path)
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes)
    base *= density / base.mean()
    detect = np.tile(np.minimum(base, 0.9), (n_types, 1))
    mean_count = np.full((n_types, n_genes), 0.5)
    # about 1 % highly expressed, always-detected genes (as mitochondrial and ribosomal genes are)
    high = rng.choice(n_genes, size=max(1, n_genes // 100), replace=False)
    detect[:, high], mean_count[:, high] = 0.9, 30.0
    for t in range(n_types):
        own = rng.choice(n_genes, size=markers, replace=False)
        detect[t, own] = np.minimum(detect[t, own] * 6 + 0.1, 0.9)
        mean_count[t, own] = 3.0
    cumulative = np.cumsum(detect, axis=1)
    # one increasing array for all types (type t's cumulative probabilities shifted by t × (its max + 1)),
    # so one searchsorted serves every cell whatever its type
    shift = float(cumulative[:, -1].max()) + 1.0
    flat_cumulative = (cumulative + shift * np.arange(n_types)[:, None]).ravel()
    rng = np.random.default_rng([seed, seed if cell_seed is None else cell_seed])
    cell_types = rng.integers(0, n_types, size=n_cells)
    names = np.array([f"type_{t}" for t in range(n_types)])
    obs = pd.DataFrame({label_column: pd.Categorical(names[cell_types], categories=names)},
                       index=pd.Index([f"{name_prefix}_{i:07d}" for i in range(n_cells)]))
    var = pd.DataFrame(index=pd.Index([f"gene_{g:05d}" for g in range(n_genes)]))
    ad.AnnData(obs=obs, var=var).write_h5ad(path)  # obs, var, empty uns/obsm/...; X added below

    with h5py.File(path, "a") as handle:
        if "X" in handle:
            del handle["X"]
        group = handle.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": np.array([n_cells, n_genes], dtype=np.int64)})
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 16,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        stored = 0
        # a chunk's (cell, gene) pairs are deduplicated in a boolean mask of chunk × genes (np.unique of
        # the keys hashes and sorts them: 20× slower); at most 2²⁶ entries (64 MB) at a time
        step = max(1, min(int(chunk_cells), (1 << 26) // n_genes))
        for start in range(0, n_cells, step):
            types = cell_types[start:start + step]
            n = len(types)
            size = rng.gamma(4.0, 0.25, size=n)
            draws = rng.poisson(size * cumulative[types, -1])
            cell = np.repeat(np.arange(n), draws)
            offset = shift * types[cell]
            u = rng.random(cell.size) * cumulative[types[cell], -1] + offset
            gene = np.searchsorted(flat_cumulative, u, side="right") - types[cell].astype(np.int64) * n_genes
            np.clip(gene, 0, n_genes - 1, out=gene)
            seen = np.zeros(n * n_genes, dtype=bool)
            seen[cell.astype(np.int64) * n_genes + gene] = True
            key = np.flatnonzero(seen)  # sorted by cell, then gene: CSR order
            cell, gene = np.divmod(key, n_genes)
            counts = 1 + rng.poisson(size[cell] * mean_count[types[cell], gene])
            data.resize((stored + key.size,))
            indices.resize((stored + key.size,))
            data[stored:] = counts.astype(np.float32)
            indices[stored:] = gene.astype(np.int32)
            indptr[start + 1:start + n + 1] = stored + np.cumsum(np.bincount(cell, minlength=n))
            stored += key.size
    return path
