"""A straightforward loop implementation of the original Fotomics gene placement.

This is the *reference* the core benchmark compares
:class:`napari_omicsimage.layouts.FotomicsFFT` against.  It follows the
algorithm as published (Zandavi, Liu & Vafaee 2022, "Fotomics") and written in
its original code style: one sample at a time, explicit Python loops over the
genes, no vectorisation across samples.

Per sample (one row of the samples × genes matrix):

1. FFT across the genes, then ``fftshift`` so bin ``i`` of the shifted spectrum
   belongs to gene ``i``;
2. separately for the real and the imaginary part, values outside
   ``P10 − 1.5·IQR … P90 + 1.5·IQR`` (``IQR = P90 − P10``, percentiles of that
   sample's part) are set to 0;
3. the kept values are added to running per-gene sums.

Gene ``i`` is placed at (mean real part, mean imaginary part) of bin ``i`` over
the samples.  Nothing here is used by the package itself.
"""

from __future__ import annotations

import numpy as np


def fotomics_coordinates_loop(x: np.ndarray) -> np.ndarray:
    """Fotomics gene coordinates ``(G, 2)`` of a samples × genes matrix, by loops."""
    x = np.asarray(x)
    n_samples, n_genes = x.shape
    real_sums = [0.0] * n_genes
    imag_sums = [0.0] * n_genes
    for sample in range(n_samples):
        spectrum = np.fft.fftshift(np.fft.fft(x[sample].astype(np.float64)))
        for part, sums in ((spectrum.real, real_sums), (spectrum.imag, imag_sums)):
            p10, p90 = np.percentile(part, [10, 90])
            iqr = p90 - p10
            lower, upper = p10 - 1.5 * iqr, p90 + 1.5 * iqr
            for gene in range(n_genes):
                value = part[gene]
                if value < lower or value > upper:
                    value = 0.0  # outlier bins do not move the gene
                sums[gene] += value
    return np.column_stack([np.asarray(real_sums) / n_samples, np.asarray(imag_sums) / n_samples])


class LoopFotomics:
    """The loop reference as a pyDeepInsight feature extractor.

    ``ImageTransformer.fit(X)`` calls ``fit_transform(X.T)`` (genes × samples),
    so the reference runs through the same convex hull, rotation and binning as
    :class:`~napari_omicsimage.layouts.FotomicsLayout`.  The last coordinates
    are kept in ``coords_`` so they can be compared without recomputing them.
    """

    def fit_transform(self, points: np.ndarray) -> np.ndarray:
        self.coords_ = fotomics_coordinates_loop(np.asarray(points).T)
        return self.coords_
