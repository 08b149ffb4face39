"""Core speed benchmark: our renderer and layouts against the reference implementations.

Three stages, all on the same synthetic expression matrix (default 1000 samples
× 20,000 genes, values in [0, 1], fixed seed) and a 224 × 224 grid:

``render``
    :meth:`PixelMap.render` (through ``layout.transform``) against
    pyDeepInsight's ``ImageTransformer.transform(X, img_format="scalar")``.
    One ImageTransformer is fitted once; our layout is built from its
    ``coords()``, so both draw the *same* gene → pixel map.  Reports the time
    ratio and the largest absolute difference between the images.
``tsne``
    Fitting the default DeepInsight layout (``feature_extractor="tsne"``, our
    :class:`FastTSNE`: PCA then openTSNE) against pyDeepInsight fitted with the
    t-SNE it uses for ``"tsne"`` (scikit-learn ``TSNE(n_components=2,
    metric="cosine")``).  Beside each time: the trustworthiness of the gene
    pixel positions with respect to the genes' expression profiles (cosine
    distance, 10 neighbours) on a fixed random subset of genes, the same subset
    for both.
``fotomics``
    :meth:`FotomicsLayout.fit` against the same pyDeepInsight hull / rotation /
    binning driven by a loop implementation of the original Fotomics algorithm
    (``_fotomics_reference.py``).  Gene coordinates and pixels must agree.

Timings are wall-clock seconds of one call each (``time.perf_counter``), never
asserted: speed claims live here and in ``docs/benchmarks.md`` only.  Peak
memory is the growth of the process's peak resident set size (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` before each call) over the
resident size at the start of the call, so native allocations (BLAS, openTSNE,
scikit-learn) count too; where that reset is unavailable, ``tracemalloc`` peak
is used instead and the table says so.

Usage::

    python benchmarks/bench_core.py            # full size (several minutes)
    python benchmarks/bench_core.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fotomics_reference import LoopFotomics

from napari_omicsimage.layouts import DeepInsightLayout, FastTSNE, FotomicsFFT, FotomicsLayout
from napari_omicsimage.render import PixelMap

FULL = {"n_samples": 1000, "n_genes": 20_000, "n_modules": 300, "size": 224, "score_genes": 2000}
QUICK = {"n_samples": 200, "n_genes": 2000, "n_modules": 60, "size": 64, "score_genes": 500}


# ------------------------------------------------------------------ data
def make_expression(n_samples: int, n_genes: int, n_modules: int, seed: int = 0) -> np.ndarray:
    """Synthetic but structured samples × genes matrix, float32 in [0, 1].

    Genes come from ``n_modules`` co-expression modules.  Module activities
    differ between 5 sample groups (as between tumour subtypes).  A gene is its
    primary module's activity (loading 0.5–1.5, random sign) plus a secondary
    module's (loading 0–1) plus Gaussian noise whose SD varies log-uniformly
    from 0.5 to 8 between genes, from tight module members to nearly pure
    noise.  That spread matters: with one module and equal noise per gene,
    t-SNE packs each module onto a few pixels (20,000 genes on 2,474 pixels
    of 224²), while this spreads genes like real data (about 13,000 pixels,
    0.65 per gene; 14,201 pixels for the 21,641 genes of the medulloblastoma
    set).
    Each gene is then min-max scaled to [0, 1], the scaling DeepInsight expects.
    """
    rng = np.random.default_rng(seed)
    n_groups = 5
    group = rng.integers(n_groups, size=n_samples)
    activity = rng.normal(0.0, 1.0, size=(n_groups, n_modules))[group]
    activity += rng.normal(0.0, 1.0, size=(n_samples, n_modules))
    primary = rng.integers(n_modules, size=n_genes)
    secondary = rng.integers(n_modules, size=n_genes)
    primary_loading = rng.uniform(0.5, 1.5, size=n_genes) * rng.choice([-1.0, 1.0], size=n_genes)
    secondary_loading = rng.uniform(0.0, 1.0, size=n_genes) * rng.choice([-1.0, 1.0], size=n_genes)
    noise_sd = np.exp(rng.uniform(np.log(0.5), np.log(8.0), size=n_genes))
    x = activity[:, primary] * primary_loading + activity[:, secondary] * secondary_loading
    x += rng.normal(0.0, 1.0, size=(n_samples, n_genes)) * noise_sd
    x -= x.min(axis=0)
    x /= x.max(axis=0)
    return x.astype(np.float32)


# ------------------------------------------------------------- measuring
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


PEAK_RSS = _can_reset_peak_rss()
MEMORY_METHOD = "peak RSS growth (VmHWM)" if PEAK_RSS else "tracemalloc peak"


@dataclass
class Measurement:
    seconds: float  # median over the runs
    peak_mib: float  # largest over the runs
    runs: list[float] = field(default_factory=list)
    result: object = field(repr=False, default=None)


def _measure_once(fn, args, kwargs) -> tuple[object, float, float]:
    if PEAK_RSS:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := current RSS
        start_kib = _status_kib("VmRSS")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        return result, seconds, (_status_kib("VmHWM") - start_kib) / 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak_mib


def measure(fn, *args, repeats: int = 1, **kwargs) -> Measurement:
    """Run ``fn`` ``repeats`` times: median wall-clock time, largest peak memory, last result.

    Each run's result is released before the next run starts, so a repeat can
    reuse memory the previous one touched.  On the shared benchmark machine
    (a virtual machine) first touching fresh memory costs about 3 ms per MB,
    which dominates a first call that writes hundreds of MB; ``runs`` keeps
    every time, the first one included.
    """
    times, peaks, result = [], [], None
    for _ in range(max(1, repeats)):
        result = None
        result, seconds, peak_mib = _measure_once(fn, args, kwargs)
        times.append(seconds)
        peaks.append(peak_mib)
    return Measurement(float(np.median(times)), max(peaks), times, result)


@dataclass
class Row:
    stage: str
    ours_s: float
    reference_s: float
    quality: str
    ours_mib: float
    reference_mib: float
    details: dict = field(default_factory=dict)
    ours_runs: list[float] = field(default_factory=list)
    reference_runs: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.reference_s / self.ours_s


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with pyDeepInsight's string-extractor deprecation warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


def _image_transformer(extractor, size: int):
    from pyDeepInsight import ImageTransformer

    return ImageTransformer(feature_extractor=extractor, discretization="bin", pixels=(size, size))


def gene_names(n_genes: int) -> list[str]:
    return [f"gene_{i}" for i in range(n_genes)]


# ---------------------------------------------------------------- stages
def bench_render(x: np.ndarray, size: int, seed: int = 0, extractor=None, repeats: int = 3) -> Row:
    """Our sparse-product renderer vs ``ImageTransformer.transform`` on identical coordinates.

    The layout comes from ``extractor`` (default: our t-SNE, as DeepInsight
    users get it); only the rendering is timed.
    """
    transformer = _image_transformer(extractor if extractor is not None else FastTSNE(random_state=seed), size)
    _quiet(transformer.fit, x)  # the layout itself is not timed here
    coords = transformer.coords()
    layout = DeepInsightLayout(size=size, feature_extractor="tsne", random_state=seed)
    layout.pixel_map_ = PixelMap(coords[None], (size, size), gene_names(x.shape[1]))

    ours = measure(layout.transform, x, repeats=repeats)
    reference = measure(transformer.transform, x, img_format="scalar", repeats=repeats)
    images, ref_images = ours.result, reference.result
    if images.shape != (x.shape[0], 1, size, size) or ref_images.shape != (x.shape[0], size, size):
        raise AssertionError(f"unexpected image shapes {images.shape} and {ref_images.shape}")
    max_diff = float(np.abs(images[:, 0].astype(np.float64) - ref_images).max())
    # float32 (ours) vs float64 (pyDeepInsight) averaging of values in [0, 1]
    if max_diff > 1e-5:
        raise AssertionError(f"rendered images differ from pyDeepInsight's by up to {max_diff:.3g}")
    occupied = int((layout.pixel_map_.density() > 0).sum())
    return Row(
        stage=f"render {x.shape[0]}×{x.shape[1]:,} → {size}² (PixelMap.render vs ImageTransformer.transform)",
        ours_s=ours.seconds, reference_s=reference.seconds,
        quality=f"max abs diff {max_diff:.1e}",
        ours_mib=ours.peak_mib, reference_mib=reference.peak_mib,
        ours_runs=ours.runs, reference_runs=reference.runs,
        details={"max_abs_diff": max_diff, "occupied_pixels": occupied,
                 "ours_dtype": str(images.dtype), "reference_dtype": str(ref_images.dtype)},
    )


def gene_trustworthiness(x: np.ndarray, gene_coords: np.ndarray, subset: np.ndarray) -> float:
    """Trustworthiness (10 neighbours) of 2-D gene positions w.r.t. the genes' cosine distances."""
    from sklearn.manifold import trustworthiness

    profiles = np.asarray(x[:, subset].T, dtype=np.float64)
    return float(trustworthiness(profiles, np.asarray(gene_coords, dtype=np.float64)[subset],
                                 n_neighbors=10, metric="cosine"))


def bench_tsne_layout(x: np.ndarray, size: int, seed: int = 0, score_genes: int = 2000,
                      sklearn_genes: int | None = None, repeats: int = 3) -> Row:
    """Default DeepInsight layout fit (FastTSNE) vs pyDeepInsight with scikit-learn's t-SNE.

    ``sklearn_genes`` fits the reference on the first that many genes only
    (for machines where the full fit takes too long); the row says so.  The
    reference runs once (minutes); ours ``repeats`` times.
    """
    from sklearn.manifold import TSNE

    n_genes = x.shape[1]
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n_genes, size=min(score_genes, n_genes), replace=False))

    layout = DeepInsightLayout(size=size, feature_extractor="tsne", discretization="bin", random_state=seed)
    ours = measure(layout.fit, x, gene_names(n_genes), repeats=repeats)
    ours_coords = layout.pixel_map_.gene_pixels[0]
    ours_score = gene_trustworthiness(x, ours_coords, subset)

    ref_x = x if not sklearn_genes or sklearn_genes >= n_genes else x[:, :sklearn_genes]
    # exactly the extractor pyDeepInsight builds for feature_extractor="tsne", seeded
    transformer = _image_transformer(TSNE(n_components=2, metric="cosine", random_state=seed), size)
    reference = measure(_quiet, transformer.fit, ref_x)
    ref_coords = transformer.coords()
    if ref_x is x:
        ref_score = gene_trustworthiness(x, ref_coords, subset)
        ref_label = f"{ref_score:.3f}"
        genes_label = f"{n_genes:,}"
    else:
        ref_subset = subset[subset < ref_x.shape[1]]
        ref_score = gene_trustworthiness(ref_x, ref_coords, ref_subset)
        ref_label = f"{ref_score:.3f} (on {ref_x.shape[1]:,} genes)"
        genes_label = f"{n_genes:,} (reference: {ref_x.shape[1]:,})"
    return Row(
        stage=f"t-SNE layout fit, {genes_label} genes (FastTSNE vs sklearn TSNE cosine)",
        ours_s=ours.seconds, reference_s=reference.seconds,
        quality=f"trustworthiness {ours_score:.3f} vs {ref_label}",
        ours_mib=ours.peak_mib, reference_mib=reference.peak_mib,
        ours_runs=ours.runs, reference_runs=reference.runs,
        details={"ours_trustworthiness": ours_score, "reference_trustworthiness": ref_score,
                 "reference_genes": int(ref_x.shape[1]), "score_genes": len(subset)},
    )


def bench_fotomics(x: np.ndarray, size: int, repeats: int = 3) -> Row:
    """Vectorised Fotomics fit vs the loop reference; the layouts must be identical."""
    n_genes = x.shape[1]
    layout = FotomicsLayout(size=size, discretization="bin")
    ours = measure(layout.fit, x, gene_names(n_genes), repeats=repeats)

    loop = LoopFotomics()
    transformer = _image_transformer(loop, size)
    reference = measure(_quiet, transformer.fit, x, repeats=repeats)

    ours_coords = FotomicsFFT().fit_transform(np.asarray(x, dtype=np.float32).T)
    coord_diff = float(np.abs(ours_coords - loop.coords_).max())
    scale = float(np.abs(loop.coords_).max())
    if not np.allclose(ours_coords, loop.coords_, rtol=1e-9, atol=1e-12 * max(scale, 1.0)):
        raise AssertionError(f"Fotomics gene coordinates differ from the loop reference by {coord_diff:.3g}")
    same_pixels = bool(np.array_equal(layout.pixel_map_.gene_pixels[0], transformer.coords()))
    if not same_pixels:
        n_moved = int((layout.pixel_map_.gene_pixels[0] != transformer.coords()).any(axis=1).sum())
        raise AssertionError(f"{n_moved} genes sit in different pixels than in the loop reference")
    return Row(
        stage=f"Fotomics fit, {x.shape[0]}×{n_genes:,} (FotomicsLayout.fit vs loop reference)",
        ours_s=ours.seconds, reference_s=reference.seconds,
        quality=f"identical pixels; max coord diff {coord_diff:.1e}",
        ours_mib=ours.peak_mib, reference_mib=reference.peak_mib,
        ours_runs=ours.runs, reference_runs=reference.runs,
        details={"max_coord_diff": coord_diff, "identical_pixels": same_pixels},
    )


# --------------------------------------------------------------- report
def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| stage | ours (s) | reference (s) | ratio | quality / difference | peak memory ours / reference (MiB) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.stage} | {row.ours_s:.2f} | {row.reference_s:.2f} | {row.ratio:.{1 if row.ratio < 10 else 0}f}× "
            f"| {row.quality} | {row.ours_mib:.0f} / {row.reference_mib:.0f} |"
        )
    return "\n".join(lines)


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times) + " s"


def machine_description() -> str:
    try:
        import torch

        gpu = "CUDA GPU present" if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "GPU unknown (torch not installed)"
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def library_versions() -> str:
    from importlib.metadata import version

    import openTSNE
    import scipy
    import sklearn

    return (f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-learn {sklearn.__version__}, "
            f"openTSNE {openTSNE.__version__}, pyDeepInsight {version('pyDeepInsight')}")


STAGES = ("render", "tsne", "fotomics")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small smoke run ({QUICK['n_samples']} samples × {QUICK['n_genes']} genes, "
                             f"{QUICK['size']}² grid)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sklearn-genes", type=int, default=None,
                        help="fit the scikit-learn t-SNE reference on only this many genes "
                             "(default: all, as the comparison should be)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per timed call, median reported (default 3); the scikit-learn "
                             "t-SNE reference always runs once")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    args.stages = stages
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    x = make_expression(sizes["n_samples"], sizes["n_genes"], sizes["n_modules"], seed=args.seed)
    print(f"data: {x.shape[0]} samples × {x.shape[1]} genes ({sizes['n_modules']} modules), "
          f"float32 in [0, 1], seed {args.seed}; grid {sizes['size']}²", file=sys.stderr, flush=True)
    rows = []
    for stage in args.stages:
        print(f"running {stage} …", file=sys.stderr, flush=True)
        if stage == "render":
            rows.append(bench_render(x, sizes["size"], seed=args.seed, repeats=args.repeats))
        elif stage == "tsne":
            rows.append(bench_tsne_layout(x, sizes["size"], seed=args.seed, score_genes=sizes["score_genes"],
                                          sklearn_genes=args.sklearn_genes, repeats=args.repeats))
        else:
            rows.append(bench_fotomics(x, sizes["size"], repeats=args.repeats))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    command = "python benchmarks/bench_core.py" + (" --quick" if args.quick else "")
    if args.stages != list(STAGES):
        command += " --stages " + ",".join(args.stages)
    if args.sklearn_genes:
        command += f" --sklearn-genes {args.sklearn_genes}"
    if args.repeats != 3:
        command += f" --repeats {args.repeats}"
    report = "\n".join([
        markdown_table(rows),
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine_description()}",
        f"- libraries: {library_versions()}",
        (f"- times: median wall-clock seconds of {args.repeats} run(s) (the scikit-learn t-SNE: one run); "
         "ratio = reference / ours; every run below, first (cold) call first"),
        f"- memory: {MEMORY_METHOD}, largest over the runs",
        *[f"  - {row.stage.split(' (')[0]}: ours {_runs(row.ours_runs)}; reference {_runs(row.reference_runs)}"
          for row in rows],
    ])
    print(report)
    if args.output is not None:
        args.output.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
