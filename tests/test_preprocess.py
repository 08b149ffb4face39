"""Preprocessing: scanpy steps, the log-scale switch, and fitting on training samples only."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.preprocess import Preprocessor, looks_log_scale, normalize_samples


def counts_adata(n=30, g=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(5, size=(n, g)).astype(np.float32) * rng.integers(1, 4, size=(n, 1))
    return ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))


@pytest.mark.parametrize("seed", range(4))
def test_counts_are_detected_normalised_and_logged(seed):
    adata = counts_adata(seed=seed)
    assert adata.X.max() <= 50  # small counts: the old "max ≤ 50 → log-scale" rule misread exactly these
    assert not looks_log_scale(adata)
    out = normalize_samples(adata)  # detected, not forced
    assert out.uns["omicsimage"]["normalized"] is True
    assert out.uns["omicsimage"]["scale"].startswith("values read as counts")
    np.testing.assert_allclose(np.expm1(out.X).sum(axis=1), 1e4, rtol=1e-4)
    assert adata.X.max() > out.X.max()  # the input AnnData is untouched (a copy is returned)


def test_non_integer_values_decide_by_their_range(toy_adata):
    assert looks_log_scale(toy_adata)  # N(5, 1): log2 microarray-like
    tpm = toy_adata.copy()
    tpm.X = np.exp2(tpm.X) * 3.7  # unlogged, non-integer, up to hundreds
    assert not looks_log_scale(tpm)


def test_log_scale_data_are_not_normalised_twice(toy_adata):
    assert looks_log_scale(toy_adata)
    out = normalize_samples(toy_adata)
    np.testing.assert_array_equal(out.X, toy_adata.X)


def test_negative_values_cannot_be_treated_as_counts(toy_adata):
    toy_adata.X[0, 0] = -1
    with pytest.raises(OmicsInputError, match="negative values"):
        normalize_samples(toy_adata, log_scale=False)


def test_qc_filter_removing_everything_is_explained():
    with pytest.raises(OmicsInputError, match="lower min_genes"):
        normalize_samples(counts_adata(), log_scale=False, min_genes=10_000)


def test_preprocessor_learns_genes_and_ranges_from_training_samples_only(toy_adata):
    train, test = toy_adata[:20].copy(), toy_adata[20:].copy()
    test.X[:, :] += 100  # wildly different test samples must not move the fitted statistics
    test.X[:, 20:] *= 5  # and would pick other genes as most variable if they were seen
    prep = Preprocessor(n_top_genes=10).fit(train)
    # what a fit on the training rows alone must give, computed independently (log-scale data: no scaling)
    x_train = np.asarray(train.X)
    expected_genes = np.sort(np.argsort(-x_train.var(axis=0), kind="stable")[:10])
    assert list(prep.genes_) == [f"g{i}" for i in expected_genes]
    np.testing.assert_allclose(prep.min_, x_train[:, expected_genes].min(axis=0))
    np.testing.assert_allclose(prep.max_, x_train[:, expected_genes].max(axis=0))
    # a fit that sees the test rows gives other genes and ranges, so the check above can fail
    both = ad.concat([train, test])
    leaky = Preprocessor(n_top_genes=10).fit(both)
    assert list(leaky.genes_) != list(prep.genes_)
    x_test = prep.transform(test)
    assert x_test.shape == (20, 10) and x_test.max() <= 1.0 and x_test.min() >= 0.0
    assert np.all(x_test == 1.0)  # clipped to the training range


def test_preprocessor_state_roundtrip(toy_adata):
    prep = Preprocessor(n_top_genes=12).fit(toy_adata)
    again = Preprocessor.from_state(prep.state())
    np.testing.assert_array_equal(again.transform(toy_adata), prep.transform(toy_adata))


def test_missing_genes_at_transform_are_named(toy_adata):
    prep = Preprocessor(n_top_genes=None).fit(toy_adata)
    with pytest.raises(OmicsInputError, match="missing"):
        prep.transform(toy_adata[:, 5:].copy())
