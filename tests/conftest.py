"""Shared fixtures: small synthetic data with known answers, and the real data sets in ../shared/data."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
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
