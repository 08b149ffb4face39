"""Image layouts: where each gene (or sample) goes on the image grid.

Every layout follows scikit-learn: ``fit(x_train, genes)`` on training samples
only, then ``transform(x)`` for any samples with the same genes, returning
float32 images ``(N, C, H, W)``.  Gene layouts expose a
:class:`~napari_omicsimage.render.PixelMap` (``layout.pixel_map_``) giving, per
channel, the gene→pixel and pixel→genes maps.

=================  ==========================================================
method             what it is
=================  ==========================================================
``deepinsight``    pyDeepInsight ``ImageTransformer`` over genes (t-SNE, UMAP,
                   PCA or kernel PCA; ``bin``/``qtb`` discretisation, or
                   ``lsa``/``ags`` assignment: one gene per pixel)
``fotomics``       genes placed by the FFT of the samples (Fotomics)
``rgb-layouts``    three gene layouts (t-SNE, PCA, UMAP) as R, G and B
``grid``           one gene per pixel, in input, chromosome or cluster order
``som``            a self-organising map of gene profiles (minisom), then one
                   gene per map node by assignment
``rgb-embedding``  the published RGB method (Alyatimi et al. 2025): one blob
                   per *sample*; no gene information
=================  ==========================================================

Input values are expected in [0, 1] (see :class:`~napari_omicsimage.preprocess.Preprocessor`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .annotation import chromosome_positions
from .errors import OmicsInputError
from .progress import ProgressEvent
from .render import PixelMap, check_image_memory

METHODS = ("deepinsight", "fotomics", "rgb-embedding", "rgb-layouts", "grid", "som")
FEATURE_EXTRACTORS = ("tsne", "umap", "pca", "kpca", "tsne-sklearn")
DISCRETIZATIONS = ("bin", "qtb", "lsa", "ags")
#: Discretisations that assign every gene its own pixel (an assignment problem on gene-to-pixel distances):
#: ``lsa`` solves it exactly (scipy's linear_sum_assignment), ``ags`` approximately (asymmetric greedy search,
#: pyDeepInsight's option for large grids).  Without a size they take the smallest square holding every gene.
ASSIGNMENT_DISCRETIZATIONS = ("lsa", "ags")
GRID_ORDERS = ("cluster", "chromosome", "input")
#: The fewest genes each method can lay out (named in every "too few genes" message).
MIN_GENES = {"grid": 2, "rgb-embedding": 2, "deepinsight": 3, "fotomics": 3, "rgb-layouts": 3, "som": 3}


def min_genes_text() -> str:
    """Each method's minimum gene count, as one phrase for messages."""
    return ", ".join(f"{method} {n}" for method, n in MIN_GENES.items())


def check_gene_count(what: str, method: str, n_genes: int) -> None:
    """Refuse fewer genes than ``method`` can lay out, naming every method's minimum."""
    if n_genes < MIN_GENES[method]:
        raise OmicsInputError(
            f"{what} needs at least {MIN_GENES[method]} genes, got {n_genes}; keep more genes (check "
            f"--n-top-genes and that the genes vary across samples). Fewest genes per method: "
            f"{min_genes_text()}.")
#: Clustered order is the default: on every data set in docs/benchmarks.md#accuracy whose genes the
#: annotation cannot place, it beat input order (balanced accuracy SRBCT 0.928 vs 0.880, ALL mol.biol 0.633
#: vs 0.537, ALL B/T 1.000 vs 0.973), it beat chromosome order on PBMC (0.627 vs 0.602; medulloblastoma 0.972
#: vs 1.000), and it needs no gene names.
DEFAULT_GRID_ORDER = "cluster"
#: Image side of the gene layouts when none is given.  32 rather than 64: with the small CNN, 64² images
#: scored lower in 4 of 6 comparisons (Fotomics on SRBCT 0.920 vs 0.967 balanced accuracy, on ALL mol.biol
#: 0.631 vs 0.777; docs/benchmarks.md#accuracy).  Larger images put fewer genes in each pixel, for reading
#: saliency at finer gene resolution; ask for them with ``size``.
DEFAULT_IMAGE_SIZE = 32
#: Clustering is quadratic in genes (12,625 genes: 30 s and 1.4 GB here); above this we warn.
CLUSTER_WARN_GENES = 10_000


def smallest_square(n_genes: int) -> tuple[int, int]:
    """The smallest square grid with at least one pixel per gene."""
    side = max(2, math.ceil(math.sqrt(n_genes)))
    return side, side


#: Placing genes on pixels keeps a few arrays over all pixels (pyDeepInsight's pixel centroids and
#: assignment: int64 row and column per pixel, float coordinates), about this many bytes per pixel.
_FIT_BYTES_PER_PIXEL = 32


def _size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    h, w = (int(s) for s in size)
    if h < 2 or w < 2:
        raise OmicsInputError(f"image size must be at least 2×2 pixels, got {h}×{w}.")
    return h, w


def _check_pixel_grid(size: tuple[int, int]) -> None:
    """Fitting at an absurd size would exhaust memory on the pixel grid alone: refuse it first."""
    check_image_memory(1, 1, size, bytes_per_value=_FIT_BYTES_PER_PIXEL, what="pixel grid for placing genes")


#: why a layout without a gene map (:attr:`Layout.has_gene_map` False) cannot rank genes
NO_GENE_MAP = ("the published RGB method (rgb-embedding) draws each sample as a blob at its position in a "
               "sample embedding; its pixels are not genes, so no gene mapping exists and saliency cannot "
               "be traced to genes. Use a gene layout (deepinsight, fotomics, rgb-layouts, grid) to rank genes.")


# ============================================================ base classes
class Layout:
    """Common interface of all layouts."""

    method: str = ""
    #: False for layouts whose pixels are not genes (the published RGB method)
    has_gene_map: bool = True

    def fit(self, x: np.ndarray, genes=None) -> "Layout":  # pragma: no cover - abstract
        raise NotImplementedError

    def transform(self, x: np.ndarray, **render_options):  # pragma: no cover - abstract
        raise NotImplementedError

    def fit_transform(self, x: np.ndarray, genes=None, **render_options):
        return self.fit(x, genes).transform(x, **render_options)

    #: channels of the images, known before fitting (memory checks)
    planned_channels: int = 1

    def check_memory(self, n_samples: int) -> None:
        """Refuse, before any work, images of ``n_samples`` that would not fit in memory."""
        if self.size is not None:
            check_image_memory(n_samples, self.planned_channels, self.size)

    @property
    def shape(self) -> tuple[int, int]:
        return self.size

    def describe(self) -> str:
        return self.method

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:  # pragma: no cover - abstract
        """``(meta, arrays)``: JSON-able parameters and numeric arrays, nothing executable."""
        raise NotImplementedError


def _check_matrix(x: np.ndarray, genes) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise OmicsInputError(f"expected a samples × genes matrix, got an array of shape {x.shape}.")
    if x.shape[0] < 2:
        raise OmicsInputError(f"a layout needs at least 2 training samples, got {x.shape[0]}.")
    if not np.isfinite(x).all():
        raise OmicsInputError("the matrix holds NaN or infinite values; clean the data first.")
    if genes is None:
        genes = [f"gene_{i}" for i in range(x.shape[1])]
    genes = np.asarray([str(g) for g in genes], dtype=object)
    if len(genes) != x.shape[1]:
        raise OmicsInputError(f"{len(genes)} gene names for a matrix with {x.shape[1]} columns.")
    return x, genes


class GeneLayout(Layout):
    """A layout that puts genes on pixels; rendering goes through its PixelMap.

    ``size=None`` lets :meth:`_fitted_size` choose the grid when the genes are
    known (``fit``); ``self.size`` is then the fitted size and
    ``requested_size`` what the caller asked for.
    """

    def __init__(self, size=DEFAULT_IMAGE_SIZE, fill_value: float = 0.0):
        self.requested_size = None if size is None else _size(size)
        self.size = self.requested_size
        self.fill_value = float(fill_value)

    def _fitted_size(self, n_genes: int) -> tuple[int, int]:
        """The grid for ``n_genes`` genes: the requested size, else the layout's default."""
        return self.requested_size or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)

    def _place(self, gene_pixels: np.ndarray, genes) -> None:
        """Store the fitted gene → pixel map and count the genes that share a pixel (``info_``)."""
        self.pixel_map_ = PixelMap(gene_pixels, self.size, genes)
        self.info_ = {**getattr(self, "info_", {}), **collision_counts(self.pixel_map_)}

    def collisions(self) -> int:
        """Genes placed in a pixel that already holds another gene (0: one gene per pixel)."""
        self._check_fitted()
        return int(self.info_.get("n_collisions", collision_counts(self.pixel_map_)["n_collisions"]))

    def _describe_collisions(self) -> str:
        if not hasattr(self, "pixel_map_"):
            return ""
        n = self.collisions()
        return ", one gene per pixel" if n == 0 else f", {n} gene collisions"

    @property
    def n_channels(self) -> int:
        return self.pixel_map_.n_channels

    @property
    def genes_(self) -> np.ndarray:
        return self.pixel_map_.genes

    def transform(self, x, *, batch_size: int = 1024, device=None, progress=None):
        self._check_fitted()
        import scipy.sparse as sp

        return self.pixel_map_.render(
            np.asarray(x) if device is None and not sp.issparse(x) else x,
            fill_value=self.fill_value,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )

    def _check_fitted(self):
        if not hasattr(self, "pixel_map_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() on training samples first.")

    def params(self) -> dict[str, Any]:
        return {"size": None if self.requested_size is None else list(self.requested_size),
                "fill_value": self.fill_value}

    def state(self):
        self._check_fitted()
        meta = {"method": self.method, "params": self.params(), "genes": list(self.genes_),
                "info": getattr(self, "info_", {}), "fitted_size": list(self.size)}
        return meta, {"gene_pixels": self.pixel_map_.gene_pixels}

    def _size_text(self) -> str:
        return f"{self.size[0]}×{self.size[1]}" if self.size else "automatic size"


def collision_counts(pixel_map: PixelMap) -> dict[str, int]:
    """``n_collisions``: genes beyond the first in each pixel, summed over channels (the number of genes that
    would have to move for one gene per pixel); ``genes_per_pixel_max``: the most genes in one pixel."""
    density = pixel_map.density()
    occupied = int((density > 0).sum())
    return {"n_collisions": int(density.sum()) - occupied, "genes_per_pixel_max": int(density.max(initial=0))}


# ============================================= feature extractors (genes as points)
class FastTSNE:
    """t-SNE of genes, fast from a few hundred to tens of thousands of genes.

    The default DeepInsight extractor.  pyDeepInsight's own t-SNE (scikit-learn,
    cosine distance) needs minutes for 20,000 genes; this one needs seconds and
    preserves gene neighbourhoods at least as well (docs/benchmarks.md).

    Gene profiles are first reduced to ``n_components`` (50) by an *uncentred*
    truncated SVD, which keeps the cosine similarities t-SNE is asked to
    preserve (PCA's centring changes which genes are neighbours).  Nearest
    neighbours are exact (scikit-learn brute force on unit-length rows, where
    Euclidean order is cosine order) up to ``exact_max_genes``, openTSNE's
    Annoy index above.  The rest depends on the number of genes (:meth:`plan`):

    * **up to** ``fft_above`` **(5,000) genes**, where t-SNE is cheap anyway:
      scikit-learn's recipe run by openTSNE — perplexity 30, learning rate
      max(n/48, 50), 250 early-exaggeration + 750 iterations — with
      Barnes–Hut gradients on one thread (an iteration is too small to share);
    * **above**: FFT-interpolated gradients (Linderman et al. 2019) on all
      threads with openTSNE's learning rate, and a schedule of about
      ``iteration_budget`` gene-iterations (480 iterations at 5,000 genes, 120
      from 20,000 on, where neighbourhoods have settled), a third of them (at
      least 50) with early exaggeration 12;
    * **above** ``uniform_above`` **(10,000) genes**, also: uniform affinities
      over each gene's ``uniform_neighbors`` (45) nearest neighbours instead of
      perplexity 30 (Böhm, Berens & Kobak 2022: uniform kNN affinities give
      t-SNE embeddings); cheaper, and the wider neighbourhood keeps large gene
      sets' neighbourhoods better.
    """

    def __init__(self, random_state: int = 0, n_jobs: int = -1, metric: str = "cosine",
                 n_components: int = 50, perplexity: float = 30.0, fft_above: int = 5_000,
                 uniform_above: int = 10_000, uniform_neighbors: int = 45,
                 iteration_budget: int = 2_400_000, exact_max_genes: int = 50_000):
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.metric = metric
        self.n_components = n_components
        self.perplexity = perplexity
        self.fft_above = fft_above
        self.uniform_above = uniform_above
        self.uniform_neighbors = uniform_neighbors
        self.iteration_budget = iteration_budget
        self.exact_max_genes = exact_max_genes

    def plan(self, n_genes: int) -> dict:
        """The settings used for ``n_genes`` genes."""
        large = n_genes > self.fft_above
        if n_genes > self.uniform_above:
            perplexity, k = None, int(min(self.uniform_neighbors, n_genes - 1))
        else:
            perplexity = float(min(self.perplexity, max(2.0, (n_genes - 1) / 3.0)))
            k = int(min(3 * perplexity, n_genes - 1))  # the neighbourhood a perplexity needs
        if large:
            total = int(np.clip(round(self.iteration_budget / n_genes), 120, 750))
            early = max(50, total // 3)
            schedule, learning_rate = (early, total - early), "auto"
        else:
            schedule, learning_rate = (250, 750), max(n_genes / 48.0, 50.0)
        return {
            "perplexity": perplexity,  # None: uniform affinities over k neighbours
            "k": k,
            "gradient": "fft" if large else "bh",
            "n_jobs": self.n_jobs if large else 1,
            "learning_rate": learning_rate,
            "schedule": schedule,  # (early-exaggeration, plain) iterations
        }

    def _reduce(self, points: np.ndarray) -> np.ndarray:
        """Uncentred truncated SVD scores of the gene profiles (genes × ``n_components``)."""
        from sklearn.decomposition import TruncatedSVD

        n_genes, n_samples = points.shape
        n_comp = min(self.n_components, n_genes - 1)
        if n_comp < 2 or n_samples <= n_comp:
            return points
        if n_samples > 2000:
            svd = TruncatedSVD(n_components=n_comp, random_state=self.random_state)
            return svd.fit_transform(points).astype(np.float32)
        # Few samples: the right singular vectors are the top eigenvectors of the
        # small samples × samples Gram matrix, exact and several times faster
        # than randomised SVD on the tall genes × samples matrix.
        from scipy.linalg import eigh

        gram = (points.T @ points).astype(np.float64)
        _, vectors = eigh(gram, subset_by_index=[n_samples - n_comp, n_samples - 1])
        return points @ vectors[:, ::-1].astype(np.float32)

    def _neighbors(self, points: np.ndarray, k: int):
        """Exact ``k`` nearest neighbours (self excluded) as an openTSNE index."""
        from openTSNE.nearest_neighbors import PrecomputedNeighbors
        from sklearn.neighbors import NearestNeighbors

        metric = self.metric
        if metric == "cosine":
            norms = np.linalg.norm(points, axis=1, keepdims=True)
            points = points / np.where(norms > 0, norms, 1.0)
            metric = "euclidean"
        search = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric=metric, n_jobs=self.n_jobs)
        distances, indices = search.fit(points).kneighbors(points)
        if self.metric == "cosine":
            distances = distances**2 / 2  # cosine distance of unit vectors, for perplexity calibration
        # drop each gene's own entry (duplicated profiles may put it second: drop by index)
        own = indices == np.arange(len(points))[:, None]
        own[own.sum(axis=1) == 0, -1] = True
        keep = ~own
        return PrecomputedNeighbors(indices[keep].reshape(len(points), k),
                                    distances[keep].reshape(len(points), k))

    def _affinities(self, points: np.ndarray, k: int, perplexity: float | None):
        """Perplexity-based affinities over ``k`` neighbours, or uniform ones when ``perplexity`` is None."""
        from openTSNE import affinity

        if len(points) > self.exact_max_genes:
            options = {"metric": self.metric, "method": "annoy", "n_jobs": self.n_jobs,
                       "random_state": self.random_state}
            if perplexity is None:
                return affinity.Uniform(points, k_neighbors=k, **options)
            return affinity.PerplexityBasedNN(points, perplexity=perplexity, k_neighbors=k, **options)
        neighbors = self._neighbors(points, k)
        if perplexity is None:
            return affinity.Uniform(knn_index=neighbors, k_neighbors=k)
        return affinity.PerplexityBasedNN(perplexity=perplexity, knn_index=neighbors, n_jobs=self.n_jobs)

    def fit_transform(self, points: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        # The dense algebra here (Gram matrix, its eigenvectors, PCA start) is
        # small; OpenBLAS threads cost more than they save on it, badly so on a
        # busy machine (eigh of a 1000 × 1000 Gram matrix: 8 s with 2 threads,
        # 0.16 s with 1, on the benchmark machine).  Neighbour search and t-SNE
        # keep their own threads.
        with threadpool_limits(limits=1, user_api="blas"):
            return self._fit_transform(points)

    def _fit_transform(self, points: np.ndarray) -> np.ndarray:
        from openTSNE import TSNEEmbedding, initialization

        points = self._reduce(np.asarray(points, dtype=np.float32))
        plan = self.plan(len(points))
        affinities = self._affinities(points, plan["k"], plan["perplexity"])
        embedding = TSNEEmbedding(
            initialization.pca(points, random_state=self.random_state),
            affinities,
            negative_gradient_method=plan["gradient"],
            n_jobs=plan["n_jobs"],
            random_state=self.random_state,
        )
        early, plain = plan["schedule"]
        rate = plan["learning_rate"]
        embedding = embedding.optimize(n_iter=early, exaggeration=12, learning_rate=rate)
        embedding = embedding.optimize(n_iter=plain, learning_rate=rate)
        return np.asarray(embedding, dtype=np.float64)


class FotomicsFFT:
    """Fotomics gene coordinates: mean over samples of each gene's FFT bin.

    For every sample (a column of ``points``, which holds genes × samples) the
    FFT across genes is taken and shifted (``fftshift``).  Per sample, and
    separately for real and imaginary parts, values outside
    ``P10 − 1.5·IQR … P90 + 1.5·IQR`` (IQR = P90 − P10) are set to 0; gene ``i``
    is placed at the mean over samples of (real, imaginary) of bin ``i``.
    Vectorised over samples.
    """

    #: samples transformed at a time: bounds memory to a few tens of MB
    chunk_samples = 128

    def fit_transform(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points)
        n_genes, n_samples = points.shape
        sums = np.zeros((2, n_genes))
        for start in range(0, n_samples, self.chunk_samples):
            # samples × genes, so each sample's FFT and percentiles run over contiguous memory
            chunk = np.ascontiguousarray(points[:, start : start + self.chunk_samples].T, dtype=np.float64)
            spectrum = np.fft.fftshift(np.fft.fft(chunk, axis=1), axes=1)
            for part, total in zip((spectrum.real, spectrum.imag), sums):
                p10, p90 = np.percentile(part, [10, 90], axis=1, keepdims=True)
                iqr = p90 - p10
                outlier = (part < p10 - 1.5 * iqr) | (part > p90 + 1.5 * iqr)
                # Added sample after sample, the order of the original
                # per-sample loop, so the coordinates equal the original's to
                # the last bit: the minimum-area rectangle that orients the
                # image has ties on Fotomics' mirror-symmetric point set (the
                # FFT of real data is Hermitian), and a last-bit difference can
                # rotate the whole layout.
                for kept in np.where(outlier, 0.0, part):
                    total += kept
        return np.ascontiguousarray((sums / n_samples).T)


def make_feature_extractor(name: str, random_state: int = 0):
    from sklearn.decomposition import PCA, KernelPCA

    if name == "tsne":
        return FastTSNE(random_state=random_state)
    if name == "tsne-sklearn":
        from sklearn.manifold import TSNE

        # pyDeepInsight's own default extractor
        return TSNE(n_components=2, metric="cosine", random_state=random_state, init="pca")
    if name == "umap":
        return _UMAPExtractor(random_state)
    if name == "pca":
        return PCA(n_components=2, random_state=random_state)
    if name == "kpca":
        return KernelPCA(n_components=2, kernel="rbf", random_state=random_state)
    raise OmicsInputError(f"unknown feature extractor {name!r}; choose one of {FEATURE_EXTRACTORS}.")


class _UMAPExtractor:
    def __init__(self, random_state: int = 0):
        self.random_state = random_state

    def fit_transform(self, points):
        import umap

        n_neighbors = int(min(15, max(2, points.shape[0] - 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # umap warns that a seed disables parallelism
            reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=self.random_state,
                                init="spectral" if points.shape[0] > n_neighbors + 2 else "random")
            return reducer.fit_transform(np.asarray(points, dtype=np.float32))


def _image_transformer(extractor, discretization: str, size: tuple[int, int]):
    """pyDeepInsight's ImageTransformer, with its non-square ``lsa`` bug fixed.

    pyDeepInsight 0.2.3 lays out pixel centroids as ``i * height + j`` and
    decodes assignments with ``divmod(k, height)``; both must use the *width*.
    On non-square grids that gives wrong pixels or an IndexError, so we
    override exactly those two steps.  Its ``ags`` solver also shuffles rows
    with numba's unseeded generator; ours does not shuffle, so ``ags`` layouts
    are reproducible.
    """
    from pyDeepInsight import ImageTransformer

    class _ImageTransformer(ImageTransformer):
        @staticmethod
        def _get_solver(name):
            if name != "ags":
                return ImageTransformer._get_solver(name)
            try:
                from asymmetric_greedy_search import AsymmetricGreedySearch
            except ImportError as exc:
                raise OmicsInputError("the 'ags' discretisation needs the asymmetric-greedy-search package "
                                      "(pip install asymmetric-greedy-search), or use 'lsa'.") from exc
            from functools import partial

            return partial(AsymmetricGreedySearch(backend="numba").optimize, minimize=True, shuffle=False)

        @staticmethod
        def calculate_pixel_centroids(px_size):
            rows, cols = np.meshgrid(np.arange(px_size[0]), np.arange(px_size[1]), indexing="ij")
            return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(float) + 0.5

        @classmethod
        def assignment_postprocessing(cls, position, px_size, solution, labels):
            pixel = np.asarray(solution)[np.asarray(labels)]
            return np.stack(np.divmod(pixel, px_size[1]), axis=1).astype(int)

    if discretization not in DISCRETIZATIONS:
        raise OmicsInputError(f"unknown discretisation {discretization!r}; choose one of {DISCRETIZATIONS}.")
    return _ImageTransformer(feature_extractor=extractor, discretization=discretization, pixels=size)


def _fit_transformer_coords(extractor, discretization, size, x) -> np.ndarray:
    _check_pixel_grid(size)
    n_genes = x.shape[1]
    if discretization in ASSIGNMENT_DISCRETIZATIONS and n_genes > size[0] * size[1]:
        # pyDeepInsight would cluster the genes into one cluster per pixel first: pixels shared again, slowly
        side = smallest_square(n_genes)[0]
        raise OmicsInputError(
            f"'{discretization}' gives every gene its own pixel: {n_genes} genes need at least {n_genes} pixels, "
            f"not {size[0]}×{size[1]}; use size {side} (or leave the size out), or 'bin'/'qtb' for shared pixels."
        )
    transformer = _image_transformer(extractor, discretization, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        transformer.fit(x)
    return transformer.coords()


# ========================================================= gene layouts
class _TransformerLayout(GeneLayout):
    """Gene layouts placed by pyDeepInsight's ImageTransformer with a discretisation."""

    def __init__(self, size=DEFAULT_IMAGE_SIZE, discretization: str = "bin", fill_value: float = 0.0):
        super().__init__(size, fill_value)
        if discretization not in DISCRETIZATIONS:
            raise OmicsInputError(f"unknown discretisation {discretization!r}; choose one of {DISCRETIZATIONS}.")
        self.discretization = discretization
        if self.size is None and discretization not in ASSIGNMENT_DISCRETIZATIONS:
            self.size = self._fitted_size(0)  # known before fitting (memory checks)

    def _fitted_size(self, n_genes):
        if self.requested_size is None and self.discretization in ASSIGNMENT_DISCRETIZATIONS:
            return smallest_square(n_genes)
        return super()._fitted_size(n_genes)


class DeepInsightLayout(_TransformerLayout):
    """DeepInsight: genes embedded by their profiles across training samples.

    Uses pyDeepInsight's ``ImageTransformer`` (convex hull, minimum-area
    rectangle rotation, discretisation) with the chosen feature extractor.
    """

    method = "deepinsight"

    def __init__(self, size=DEFAULT_IMAGE_SIZE, feature_extractor: str = "tsne", discretization: str = "bin",
                 random_state: int = 0, fill_value: float = 0.0):
        super().__init__(size, discretization, fill_value)
        if feature_extractor not in FEATURE_EXTRACTORS:
            raise OmicsInputError(
                f"unknown feature extractor {feature_extractor!r}; choose one of {FEATURE_EXTRACTORS}."
            )
        self.feature_extractor = feature_extractor
        self.random_state = random_state

    def fit(self, x, genes=None):
        x, genes = _check_matrix(x, genes)
        check_gene_count("DeepInsight", "deepinsight", x.shape[1])
        self.size = self._fitted_size(x.shape[1])
        extractor = make_feature_extractor(self.feature_extractor, self.random_state)
        coords = _fit_transformer_coords(extractor, self.discretization, self.size, x)
        self._place(coords[None], genes)
        return self

    def params(self):
        return {**super().params(), "feature_extractor": self.feature_extractor,
                "discretization": self.discretization, "random_state": self.random_state}

    def describe(self):
        return (f"DeepInsight ({self.feature_extractor}, {self.discretization}, {self._size_text()}"
                f"{self._describe_collisions()})")


class FotomicsLayout(_TransformerLayout):
    """Fotomics: genes placed by the Fourier transform of the training samples."""

    method = "fotomics"

    def fit(self, x, genes=None):
        x, genes = _check_matrix(x, genes)
        check_gene_count("Fotomics", "fotomics", x.shape[1])
        self.size = self._fitted_size(x.shape[1])
        coords = _fit_transformer_coords(FotomicsFFT(), self.discretization, self.size, x)
        self._place(coords[None], genes)
        return self

    def params(self):
        return {**super().params(), "discretization": self.discretization}

    def describe(self):
        return f"Fotomics (FFT, {self.discretization}, {self._size_text()}{self._describe_collisions()})"


class MultiLayoutRGB(_TransformerLayout):
    """Three gene layouts as the R, G and B channels of one image.

    By default t-SNE (R), PCA (G) and UMAP (B) DeepInsight layouts: the seed
    paper's colour scheme, but every channel is a gene layout, so every pixel of
    every channel stays traceable to genes.
    """

    method = "rgb-layouts"

    def __init__(self, size=DEFAULT_IMAGE_SIZE, extractors=("tsne", "pca", "umap"), discretization: str = "bin",
                 random_state: int = 0, fill_value: float = 0.0):
        super().__init__(size, discretization, fill_value)
        self.extractors = tuple(extractors)
        for name in self.extractors:
            if name not in FEATURE_EXTRACTORS:
                raise OmicsInputError(f"unknown feature extractor {name!r}; choose from {FEATURE_EXTRACTORS}.")
        self.random_state = random_state

    def fit(self, x, genes=None):
        x, genes = _check_matrix(x, genes)
        check_gene_count("rgb-layouts", "rgb-layouts", x.shape[1])
        self.size = self._fitted_size(x.shape[1])
        channels = [
            _fit_transformer_coords(make_feature_extractor(name, self.random_state),
                                    self.discretization, self.size, x)
            for name in self.extractors
        ]
        self._place(np.stack(channels), genes)
        return self

    @property
    def planned_channels(self) -> int:
        return len(self.extractors)

    def params(self):
        return {**super().params(), "extractors": list(self.extractors),
                "discretization": self.discretization, "random_state": self.random_state}

    def describe(self):
        return (f"RGB of gene layouts ({'/'.join(self.extractors)}, {self._size_text()}"
                f"{self._describe_collisions()})")


# ----------------------------------------------------------- grid + annotation
class GridLayout(GeneLayout):
    """Direct grid: genes fill the image row by row, one per pixel (DeepMapper style).

    ``order``: ``"input"`` keeps the column order; ``"chromosome"`` sorts by
    chromosome and start (bundled annotation; genes it does not know are put
    after the annotated ones and counted in ``info_["n_unplaced"]``);
    ``"cluster"`` (the default) uses the leaf order of average-linkage
    clustering of gene profiles (correlation distance) over the training
    samples, so co-expressed genes sit side by side.
    ``size=None`` picks the smallest square that holds every gene; a smaller
    grid puts consecutive genes in the same pixel.
    """

    method = "grid"

    def __init__(self, size=None, order: str = DEFAULT_GRID_ORDER, fill_value: float = 0.0):
        if order not in GRID_ORDERS:
            raise OmicsInputError(f"unknown grid order {order!r}; choose one of {GRID_ORDERS}.")
        super().__init__(size, fill_value)
        self.order = order

    def _fitted_size(self, n_genes):
        return self.requested_size or smallest_square(n_genes)

    def fit(self, x, genes=None):
        x, genes = _check_matrix(x, genes)
        n_genes = len(genes)
        check_gene_count("a grid", "grid", n_genes)
        self.size = self._fitted_size(n_genes)
        self.info_ = {}
        if self.order == "input":
            order = np.arange(n_genes)
        elif self.order == "chromosome":
            pos = chromosome_positions(genes)
            known = pos["chrom_rank"].notna().to_numpy()
            rank = pos["chrom_rank"].fillna(1e9).to_numpy()
            start = pos["start"].fillna(0).to_numpy()
            # lexsort: last key is primary; unknown genes keep input order at the end
            order = np.lexsort((np.arange(n_genes), start, rank))
            self.info_ = {"n_unplaced": int((~known).sum()), "n_placed": int(known.sum())}
            if not known.any():
                warnings.warn("no gene matched the annotation (Ensembl ids or HGNC symbols expected); "
                              "chromosome order falls back to input order", stacklevel=2)
        else:
            order = _cluster_order(x)
        _check_pixel_grid(self.size)
        n_pixels = self.size[0] * self.size[1]
        per_pixel = math.ceil(n_genes / n_pixels)
        slot = np.empty(n_genes, dtype=np.int64)
        slot[order] = np.arange(n_genes) // per_pixel
        coords = np.stack(np.divmod(slot, self.size[1]), axis=1)
        self._place(coords[None], genes)
        return self

    def params(self):
        return {**super().params(), "order": self.order}

    def describe(self):
        return f"grid ({self.order} order, {self._size_text()}{self._describe_collisions()})"


# ------------------------------------------------------ self-organising map
class SOMLayout(GeneLayout):
    """A self-organising map of gene profiles (minisom), one gene per map node.

    Genes are points described by their profiles across the training samples,
    reduced like the t-SNE extractor's input (uncentred truncated SVD of the
    unit-length profiles to ≤ ``n_components``, so distances follow cosine
    similarity).  A rectangular SOM with one node per pixel is trained on them
    (PCA initialisation, Gaussian neighbourhood shrinking from ``sigma``, by
    default a quarter of the longer side), so similar genes land on nearby
    nodes.  Each gene then goes to a node by linear sum assignment on the
    gene-to-node-weight distances, which keeps the map's order but gives every
    gene its own pixel when there are at least as many pixels as genes
    (``size=None``: the smallest such square).  On a smaller grid each gene
    takes its best-matching node and genes share pixels; ``info_["n_collisions"]``
    counts them either way.
    """

    method = "som"

    def __init__(self, size=None, sigma: float | None = None, learning_rate: float = 0.5,
                 n_iterations: int | None = None, n_components: int = 50, random_state: int = 0,
                 fill_value: float = 0.0):
        super().__init__(size, fill_value)
        self.sigma = None if sigma is None else float(sigma)
        self.learning_rate = float(learning_rate)
        self.n_iterations = None if n_iterations is None else int(n_iterations)
        self.n_components = int(n_components)
        self.random_state = random_state
        if self.sigma is not None and self.sigma <= 0:
            raise OmicsInputError(f"SOM sigma must be positive, got {self.sigma}.")
        if self.n_iterations is not None and self.n_iterations < 1:
            raise OmicsInputError(f"SOM n_iterations must be at least 1, got {self.n_iterations}.")

    def _fitted_size(self, n_genes):
        return self.requested_size or smallest_square(n_genes)

    def fit(self, x, genes=None):
        from minisom import MiniSom
        from scipy.optimize import linear_sum_assignment
        from scipy.spatial.distance import cdist

        x, genes = _check_matrix(x, genes)
        n_genes = x.shape[1]
        check_gene_count("a SOM layout", "som", n_genes)
        self.size = self._fitted_size(n_genes)
        _check_pixel_grid(self.size)
        h, w = self.size
        points = _unit_profiles(x, self.n_components, self.random_state)
        sigma = self.sigma if self.sigma is not None else max(1.0, max(h, w) / 4)
        iterations = self.n_iterations if self.n_iterations is not None else max(5_000, 2 * n_genes)
        som = MiniSom(h, w, points.shape[1], sigma=sigma, learning_rate=self.learning_rate,
                      neighborhood_function="gaussian", random_seed=self.random_state)
        som.pca_weights_init(points)
        som.train(points, iterations, random_order=True)
        # genes × nodes distances; nodes are numbered row by row (node k is pixel divmod(k, w))
        distances = cdist(points, som.get_weights().reshape(h * w, -1))
        if h * w >= n_genes:
            _, node = linear_sum_assignment(distances**2)
        else:
            node = distances.argmin(axis=1)
        self.info_ = {"sigma": sigma, "n_iterations": iterations,
                      "quantization_error": float(distances[np.arange(n_genes), node].mean())}
        self._place(np.stack(np.divmod(node, w), axis=1)[None], genes)
        return self

    def params(self):
        return {**super().params(), "sigma": self.sigma, "learning_rate": self.learning_rate,
                "n_iterations": self.n_iterations, "n_components": self.n_components,
                "random_state": self.random_state}

    def describe(self):
        return f"SOM of genes ({self._size_text()}{self._describe_collisions()})"


def _unit_profiles(x: np.ndarray, n_components: int, random_state: int) -> np.ndarray:
    """Gene profiles (genes × samples) scaled to unit length and reduced to ≤ ``n_components`` (uncentred SVD)."""
    profiles = x.T.astype(np.float64)
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    profiles = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
    return FastTSNE(random_state=random_state, n_components=n_components)._reduce(profiles)


def _cluster_order(x: np.ndarray) -> np.ndarray:
    from scipy.cluster.hierarchy import leaves_list, linkage

    if x.shape[1] > CLUSTER_WARN_GENES:
        gib = x.shape[1] ** 2 * 8 / 2**30
        warnings.warn(f"clustering {x.shape[1]:,} genes for the grid order needs about {gib:.1f} GiB and minutes; "
                      "keep fewer genes (--n-top-genes) or choose --order input or chromosome", stacklevel=3)
    profiles = x.T.astype(np.float64)
    profiles = profiles - profiles.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    profiles = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
    return leaves_list(linkage(profiles, method="average", metric="euclidean"))


# ============================================== the published RGB method
class RGBEmbedding(Layout):
    """The published RGB method (Alyatimi et al. 2025, Algorithm 1), reproduced faithfully.

    Samples — not genes — are embedded: PCA to 50 components, then t-SNE and
    UMAP of those components.  Each embedding is min-max scaled to [0, 1] and
    each sample is drawn as a disc of radius 3 on a 128×128 black canvas, centred
    at its t-SNE position, with colour (R, G, B) = (t-SNE, PCA, UMAP) first
    coordinate (the paper leaves open how a 2-D coordinate becomes one colour
    value; we take the first axis of each).

    Two things users must know:

    * **These images carry no per-gene information.**  A pixel is a position in
      sample space, not a gene, so saliency cannot be mapped back to genes.
    * **Fitted on all samples (the paper's set-up, ``transductive``), the
      embedding sees the test samples**: their positions are shaped by the
      training samples and vice versa, which inflates cross-validated accuracy.
      Fitted on training samples, new samples go through each reducer's own
      out-of-sample transform (PCA and UMAP ``transform``, openTSNE's
      ``TSNEEmbedding.transform``).
    """

    method = "rgb-embedding"
    has_gene_map = False

    def __init__(self, size=128, radius: int = 3, n_pcs: int = 50, random_state: int = 0):
        self.size = _size(size)
        self.radius = int(radius)
        self.n_pcs = int(n_pcs)
        self.random_state = random_state

    n_channels = 3
    planned_channels = 3

    def fit(self, x, genes=None):
        import umap
        from openTSNE import TSNE
        from sklearn.decomposition import PCA

        x, genes = _check_matrix(x, genes)
        check_gene_count("rgb-embedding", "rgb-embedding", x.shape[1])
        self.genes_ = genes
        n_comp = max(2, min(self.n_pcs, x.shape[0] - 1, x.shape[1]))
        self.pca_ = PCA(n_components=n_comp, random_state=self.random_state).fit(x)
        scores = self.pca_.transform(x)
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
        self.tsne_ = TSNE(perplexity=perplexity, random_state=self.random_state, n_jobs=-1).fit(scores)
        n_neighbors = int(min(15, max(2, x.shape[0] - 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.umap_ = umap.UMAP(n_neighbors=n_neighbors, random_state=self.random_state,
                                   init="spectral" if x.shape[0] > n_neighbors + 2 else "random").fit(scores)
        embeddings = self._embeddings(scores, fitted=True)
        self.ranges_ = {k: (v.min(axis=0), v.max(axis=0)) for k, v in embeddings.items()}
        self.train_images_ = self._draw(embeddings)
        return self

    def _embeddings(self, scores, fitted=False) -> dict[str, np.ndarray]:
        if fitted:
            tsne, umap_ = np.asarray(self.tsne_), np.asarray(self.umap_.embedding_)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tsne = np.asarray(self.tsne_.transform(scores))
                umap_ = np.asarray(self.umap_.transform(scores))
        return {"tsne": tsne, "pca": scores[:, :2], "umap": umap_}

    def _scaled(self, embeddings):
        out = {}
        for key, value in embeddings.items():
            lo, hi = self.ranges_[key]
            span = np.where(hi > lo, hi - lo, 1.0)
            out[key] = np.clip((value - lo) / span, 0.0, 1.0)
        return out

    def _draw(self, embeddings) -> np.ndarray:
        scaled = self._scaled(embeddings)
        h, w = self.size
        n = scaled["tsne"].shape[0]
        check_image_memory(n, 3, self.size)
        images = np.zeros((n, 3, h, w), dtype=np.float32)
        rows = np.rint(scaled["tsne"][:, 0] * (h - 1)).astype(int)
        cols = np.rint(scaled["tsne"][:, 1] * (w - 1)).astype(int)
        colour = np.stack([scaled["tsne"][:, 0], scaled["pca"][:, 0], scaled["umap"][:, 0]], axis=1)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):  # one disc per image; n discs of ~29 pixels is cheap
            disc = (yy - rows[i]) ** 2 + (xx - cols[i]) ** 2 <= self.radius**2
            images[i][:, disc] = colour[i][:, None].astype(np.float32)
        return images

    def transform(self, x, *, batch_size: int = 1024, device=None, progress=None):
        if not hasattr(self, "pca_"):
            raise RuntimeError("RGBEmbedding is not fitted: call fit() first.")
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1] != len(self.genes_):
            raise OmicsInputError(f"expected {len(self.genes_)} genes, got {x.shape[1]}.")
        images = self._draw(self._embeddings(self.pca_.transform(x)))
        if progress is not None:
            progress(ProgressEvent.count("render", len(x), len(x)))
        if device is not None:
            import torch

            return torch.as_tensor(images, device=device)
        return images

    def fit_transform(self, x, genes=None, **render_options):
        """Training images use the fitted embedding itself (no re-projection)."""
        self.fit(x, genes)
        images = self.train_images_
        if render_options.get("device") is not None:
            import torch

            return torch.as_tensor(images, device=render_options["device"])
        return images

    def describe(self):
        return f"published RGB embedding (t-SNE/PCA/UMAP of samples, {self.size[0]}×{self.size[1]})"

    def state(self):
        raise OmicsInputError(
            "the published RGB method's fitted reducers (openTSNE, UMAP) cannot be stored as plain "
            "arrays, so this layout is kept in memory only; refit it on the training data."
        )


# ================================================================ factory
def make_layout(method: str, size=None, **params) -> Layout:
    """Build an unfitted layout by method name (the CLI's ``--method``)."""
    # size None: each layout's own default (assignment discretisations and SOMs: one pixel per gene)
    if method == "deepinsight":
        return DeepInsightLayout(size=size, **params)
    if method == "fotomics":
        return FotomicsLayout(size=size, **params)
    if method == "rgb-layouts":
        return MultiLayoutRGB(size=size, **params)
    if method == "grid":
        return GridLayout(size=size, **params)
    if method == "som":
        return SOMLayout(size=size, **params)
    if method == "rgb-embedding":
        return RGBEmbedding(size=128 if size is None else size, **params)
    raise OmicsInputError(f"unknown method {method!r}; choose one of {METHODS}.")


_LAYOUT_CLASSES = {cls.method: cls for cls in (DeepInsightLayout, FotomicsLayout, MultiLayoutRGB, GridLayout,
                                                 SOMLayout)}


def layout_from_state(meta: dict, arrays: dict[str, np.ndarray]) -> GeneLayout:
    """Rebuild a fitted gene layout from :meth:`Layout.state` output."""
    cls = _LAYOUT_CLASSES.get(meta.get("method"))
    if cls is None:
        raise OmicsInputError(f"cannot restore a layout of method {meta.get('method')!r}.")
    layout = cls(**meta["params"])
    size = tuple(meta.get("fitted_size") or meta["params"]["size"])
    layout.size = size
    layout.info_ = dict(meta.get("info", {}))
    layout.pixel_map_ = PixelMap(np.asarray(arrays["gene_pixels"]), size, meta["genes"])
    return layout


def save_layout(layout: Layout, path) -> None:
    """Write a fitted gene layout as ``.npz`` (no pickles: safe to load)."""
    import json

    meta, arrays = layout.state()
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)


def load_layout(path) -> GeneLayout:
    import json

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
    except (OSError, ValueError, KeyError) as exc:
        raise OmicsInputError(f"{path}: not a saved omicsimage layout ({exc}).") from exc
    return layout_from_state(meta, arrays)
