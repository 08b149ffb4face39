"""Shared fixtures: small synthetic data with known answers, and the real data sets in ../shared/data."""

from pathlib import Path

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts) -> Path:
    """A path under ../shared/data. Missing data skip a local run, but fail under CI=true: CI always has
    them, so a broken path must never turn into a green run."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data not found at {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: shared data must be present)")
        pytest.skip(message)
    return path


@pytest.fixture
def medulloblastoma_paths():
    folder = shared_path("medulloblastoma_gse85217_subset")
    return folder / "expression_genes_by_samples.csv.gz", folder / "labels.csv"


@pytest.fixture
def toy_adata():
    """40 samples × 30 genes, two classes, log-scale values."""
    rng = np.random.default_rng(0)
    x = rng.normal(5, 1, size=(40, 30)).astype(np.float32)
    labels = np.array(["A", "B"] * 20)
    x[labels == "B", :3] += 3
    return ad.AnnData(
        X=x,
        obs=pd.DataFrame({"label": pd.Categorical(labels)}, index=[f"s{i}" for i in range(40)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(30)]),
    )


def make_planted(n_samples=120, n_genes=200, n_classes=3, per_class=3, shift=3.0, seed=0, absent_classes=0):
    """Samples × genes (log-scale, N(6, 1) noise) where a few genes decide the class.

    For class k, ``per_class`` genes are raised by ``shift`` in its samples and
    nothing else differs.  The last ``absent_classes`` classes get no genes of
    their own: they are recognised by the *absence* of the others' genes.
    Returns ``(adata, planted)`` with ``planted`` the class → gene names map
    (empty lists for those classes) and labels in ``obs["label"]``.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % n_classes
    x = rng.normal(6.0, 1.0, size=(n_samples, n_genes)).astype(np.float32)
    genes = [f"g{i:03d}" for i in range(n_genes)]
    with_genes = n_classes - int(absent_classes)
    chosen = rng.choice(n_genes, size=with_genes * per_class, replace=False)
    planted = {}
    for k in range(n_classes):
        columns = chosen[k * per_class:(k + 1) * per_class] if k < with_genes else []
        x[np.ix_(y == k, columns)] += shift
        planted[f"class{k}"] = [genes[i] for i in columns]
    adata = ad.AnnData(
        X=x,
        obs=pd.DataFrame({"label": pd.Categorical([f"class{k}" for k in y])},
                         index=[f"s{i:03d}" for i in range(n_samples)]),
        var=pd.DataFrame(index=genes),
    )
    return adata, planted


@pytest.fixture
def planted_adata():
    """120 samples × 200 genes, 3 classes decided by 3 planted genes each (see make_planted)."""
    return make_planted()


@pytest.fixture
def torch_one_thread():
    """Run torch on one thread: on a shared 2-core machine that is faster and steadier."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
