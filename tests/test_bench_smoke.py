"""The core benchmark script runs and its comparisons hold on tiny inputs (values, never timings)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_core", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_core"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.make_expression(n_samples=24, n_genes=150, n_modules=8, seed=1)


def test_synthetic_data_is_seeded_scaled_and_modular(bench, tiny):
    assert tiny.shape == (24, 150) and tiny.dtype == np.float32
    assert tiny.min() >= 0 and tiny.max() <= 1
    np.testing.assert_array_equal(tiny, bench.make_expression(24, 150, 8, seed=1))
    assert not np.array_equal(tiny, bench.make_expression(24, 150, 8, seed=2))
    # genes of one module are correlated: the largest |r| far exceeds pure-noise levels
    corr = np.corrcoef(tiny.T)
    np.fill_diagonal(corr, 0)
    assert np.abs(corr).max(axis=1).mean() > 0.5


def test_render_matches_pydeepinsight(bench, tiny):
    from sklearn.decomposition import PCA

    row = bench.bench_render(tiny, size=12, extractor=PCA(n_components=2))
    assert row.details["max_abs_diff"] < 1e-5
    assert row.details["occupied_pixels"] > 1
    assert row.ours_s > 0 and row.reference_s > 0


def test_fotomics_loop_reference_gives_the_same_layout(bench, tiny):
    from _fotomics_reference import fotomics_coordinates_loop

    from napari_omicsimage.layouts import FotomicsFFT

    np.testing.assert_allclose(fotomics_coordinates_loop(tiny), FotomicsFFT().fit_transform(tiny.T),
                               rtol=1e-9, atol=1e-12)
    row = bench.bench_fotomics(tiny, size=12)
    assert row.details["identical_pixels"]
    assert row.details["max_coord_diff"] < 1e-9


def test_fotomics_reference_zeroes_outlier_bins(bench):
    from _fotomics_reference import fotomics_coordinates_loop

    # a constant profile puts all its energy (21.0) in the zero-frequency bin,
    # far outside P10..P90 ± 1.5·IQR of an otherwise flat spectrum: it must be zeroed
    flat = fotomics_coordinates_loop(np.ones((1, 21)))
    assert flat[21 // 2, 0] == 0.0  # after fftshift the zero-frequency bin sits in the middle
    np.testing.assert_allclose(flat, 0.0, atol=1e-12)
    # a bin inside the bounds is kept: two samples, means of their kept values
    x = np.random.default_rng(0).random((2, 40))
    coords = fotomics_coordinates_loop(x)
    spectra = np.fft.fftshift(np.fft.fft(x, axis=1), axes=1)
    kept = []
    for part in (spectra.real, spectra.imag):
        p10, p90 = np.percentile(part, [10, 90], axis=1, keepdims=True)
        iqr = p90 - p10
        kept.append(np.where((part < p10 - 1.5 * iqr) | (part > p90 + 1.5 * iqr), 0.0, part).mean(axis=0))
    np.testing.assert_allclose(coords, np.stack(kept, axis=1), atol=1e-12)
    assert np.count_nonzero(coords[:, 0]) > 30


#: how far below scikit-learn's t-SNE our layout's trustworthiness may fall on the tiny inputs; measured
#: differences (ours - sklearn) on three data seeds × two layout seeds: -0.003 … +0.012
TRUSTWORTHINESS_TOLERANCE = 0.01


@pytest.mark.slow  # three t-SNE fits of each kind: ~15 s on the shared 2-core machine
def test_tsne_stage_preserves_neighbourhoods_at_least_as_well_as_sklearn(bench, tiny):
    for x in (tiny, bench.make_expression(n_samples=24, n_genes=150, n_modules=8, seed=2)):
        row = bench.bench_tsne_layout(x, size=12, score_genes=100, repeats=1)
        ours, reference = row.details["ours_trustworthiness"], row.details["reference_trustworthiness"]
        assert 0.7 < reference <= 1.0  # the modules are recoverable: scikit-learn finds them
        assert ours >= reference - TRUSTWORTHINESS_TOLERANCE, (ours, reference)
        assert row.details["reference_genes"] == 150
    limited = bench.bench_tsne_layout(tiny, size=12, score_genes=100, sklearn_genes=90, repeats=1)
    assert limited.details["reference_genes"] == 90
    assert "reference: 90" in limited.stage


def test_main_prints_a_markdown_table(bench, tiny, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "QUICK", {"n_samples": 24, "n_genes": 150, "n_modules": 8, "size": 12,
                                         "score_genes": 100})
    out = tmp_path / "report.md"
    report = bench.main(["--quick", "--stages", "render,fotomics", "--output", str(out)])
    lines = [ln for ln in report.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| stage | ours (s) | reference (s) | ratio")
    assert len(lines) == 4  # header, rule, two stages
    assert out.read_text().strip() == report.strip()
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--stages", "nonsense"])


def test_training_throughput_script_prints_a_row_per_model():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH.with_name("bench_training.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--quick", "--device", "cpu", "--threads", "1"])
    rows = [ln for ln in report.splitlines() if ln.startswith("| small")]
    assert len(rows) == 1
    pipeline, backbone, ratio, render = (float(v.replace(",", "")) for v in rows[0].strip("|").split("|")[4:8])
    assert pipeline > 0 and backbone > 0 and render > 0
    assert ratio == pytest.approx(pipeline / backbone, rel=0.02)


def test_accuracy_script_writes_folds_and_merges_runs(tmp_path, capsys):
    shared_path("srbct_khan")
    spec = importlib.util.spec_from_file_location("accuracy_bench", BENCH.with_name("accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    out = tmp_path / "folds.csv"
    assert module.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    import pandas as pd

    folds = pd.read_csv(out)
    # --quick: srbct, two methods, the small CNN, one repeat of 5-fold CV
    assert sorted(folds.method.unique()) == ["fotomics", "grid-chromosome"]
    assert len(folds) == 2 * 5 and set(folds.fold) == {1, 2, 3, 4, 5}
    assert folds.balanced_accuracy.between(0, 1).all() and (folds.baseline_balanced_accuracy > 0.8).all()
    capsys.readouterr()
    # an older CSV without the size column merges with the new one into one table row per variant
    folds.drop(columns="size").assign(protocol="paper").to_csv(tmp_path / "old.csv", index=False)
    plot = tmp_path / "accuracy.png"
    assert module.main(["--summarise", str(out), str(tmp_path / "old.csv"), "--plot", str(plot)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| srbct")]
    assert len(rows) == 4
    assert any("| 2 ep, batch 16, lr 0.001 | fotomics | 16 | small |" in r for r in rows)
    assert any("| paper | fotomics | 32 | small |" in r for r in rows)  # rows without a size were run at 32
    assert any("| 5 × 1 | 2 ep, batch 16, lr 0.001 | grid-chromosome | grid | small |" in r for r in rows)
    assert plot.stat().st_size > 10_000


def test_accuracy_script_splits_data_sets_over_processes_and_merges_them(tmp_path):
    shared_path("srbct_khan")
    out = tmp_path / "folds.csv"
    result = subprocess.run(
        [sys.executable, str(BENCH.with_name("accuracy.py")), "--jobs", "2", "--datasets", "srbct", "medulloblastoma",
         "--methods", "fotomics", "--repeats", "1", "--epochs", "1", "--folds", "4", "--size", "16",
         "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    import pandas as pd

    folds = pd.read_csv(out)
    assert sorted(folds.dataset.unique()) == ["medulloblastoma:subgroup", "srbct:label"]
    assert len(folds) == 2 * 4  # each data set's 4 folds, merged from the two processes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folds.csv", "folds.part0.log", "folds.part1.log",
                                                          "folds_render.csv"]
    assert "process 0:" in result.stdout and "| *logistic regression (baseline)* |" in result.stdout


# ----------------------------------------------------------- explanations
@pytest.fixture(scope="module")
def explanations():
    path = BENCH.with_name("explanations.py")
    spec = importlib.util.spec_from_file_location("explanations_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["explanations_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_deletion_and_insertion_curves_follow_the_ranking(explanations):
    """A 'model' whose probability is the mean of genes 0 and 1: deleting them first empties it at k = 2."""
    def proba(rows):
        p = rows[:, :2].mean(axis=1)
        return np.stack([p, 1 - p], axis=1)

    x = np.array([[1.0, 1.0, 0.5, 0.5]], dtype=np.float32)
    baseline = np.zeros(4, dtype=np.float32)
    k_grid = np.array([0, 1, 2, 4])
    good, bad = np.array([[0, 1, 2, 3]]), np.array([[3, 2, 1, 0]])
    deletion = explanations.curves(proba, x, np.array([0]), good, baseline, k_grid, insertion=False)
    np.testing.assert_allclose(deletion, [[1.0, 0.5, 0.0, 0.0]])
    insertion = explanations.curves(proba, x, np.array([0]), bad, baseline, k_grid, insertion=True)
    np.testing.assert_allclose(insertion, [[0.0, 0.0, 0.0, 1.0]])
    worse = explanations.curves(proba, x, np.array([0]), bad, baseline, k_grid, insertion=False)
    assert explanations.auc(deletion, k_grid)[0] < explanations.auc(worse, k_grid)[0]
    np.testing.assert_allclose(explanations.auc(np.ones((1, 4)), k_grid), [1.0])


def test_top20_jaccard_and_random_tie_breaks(explanations):
    tops = [{0: set(range(20))}, {0: set(range(10, 30))}, {0: set(range(20))}]
    # pairs: 10/30, 1, 10/30
    assert explanations.mean_jaccard(tops) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    scores = np.array([[1.0, 1.0, 1.0, 0.0]])
    firsts = {int(explanations._order(scores, np.random.default_rng(s))[0, 0]) for s in range(20)}
    assert firsts == {0, 1, 2}  # tied genes come first in every order, each of them sometimes


def test_explanation_benchmark_quick_run_writes_consistent_results(explanations, tmp_path, capsys):
    out = tmp_path / "expl"
    shared_path("srbct_khan")
    assert explanations.main(["--quick", "--out-dir", str(out), "--plot", str(tmp_path / "curves.png")]) == 0
    samples = pd.read_csv(out / "samples.csv")
    assert set(samples.ranking) == {*explanations.RANKINGS, "deepmapper"}
    assert samples.auc.between(0, 1).all()
    per_sample = samples.groupby(["fold", "sample", "curve", "ranking"]).size()
    assert (per_sample == 1).all() and len(samples) == 2 * 4 * 2 * (len(explanations.RANKINGS) + 1)
    # every ranking of a sample starts from the same probability: the unchanged sample (deletion) or the baseline
    ours = samples[samples.ranking != "deepmapper"]
    assert (ours.groupby(["sample", "curve"]).p_start.nunique() == 1).all()
    stability = pd.read_csv(out / "stability.csv")
    assert set(stability.across) == {"folds", "seeds"}
    # DeepMapper after 3 epochs may get no reference sample right (no class tops: NaN); ours always has some
    assert stability[stability.method != "deepmapper"].jaccard_top20.between(0, 1).all()
    folds = pd.read_csv(out / "folds.csv")
    assert set(folds.model) == {"ours", "deepmapper"} and folds.accuracy.between(0, 1).all()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "one-sided paired Wilcoxon" in printed and "| random |" in printed
