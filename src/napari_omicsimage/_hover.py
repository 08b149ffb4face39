"""What the napari layers show, and the genes under any pixel of them (Qt-free).

:class:`ImageSet` gathers everything the omicsimage layers display — images,
the gene↔pixel map, per-sample expression, class means, predictions and
saliency — so that a pixel position on *any* of those layers can be turned
into the genes drawn there (:meth:`ImageSet.report`).  The napari side only
converts the cursor position into ``(role, row, col, sample)`` and prints
:meth:`PixelReport.status` / :meth:`PixelReport.tooltip`; everything here is
plain numpy/pandas so tests can check the text for a known pixel directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import OmicsInputError
from .explain import gene_table
from .render import PixelMap
from .streaming.lazy import is_lazy

#: Channel names shown for three-channel images (R, G, B order of the layouts).
RGB_NAMES = ("R", "G", "B")


@dataclass
class Mosaic:
    """Where each class-mean tile sits in the class-means mosaic image.

    Tiles of ``tile`` = (H, W) pixels are laid out in ``n_rows`` × ``n_cols``,
    separated by ``gap`` pixels (room for the class name above each tile).
    """

    n_rows: int
    n_cols: int
    tile: tuple[int, int]
    gap: tuple[int, int]

    @classmethod
    def for_classes(cls, n_classes: int, tile: tuple[int, int]) -> Mosaic:
        # A little wider than tall (about 1.5 tiles across per row down): under the sample image
        # in a roughly square canvas, that keeps tiles (and their class names) widest.
        n_rows = max(1, round(math.sqrt(n_classes / 1.5)))
        n_cols = math.ceil(n_classes / n_rows)
        h, w = tile
        # the band above each tile holds its class name on up to two lines (see _layers.class_name_labels)
        return cls(n_rows, n_cols, (h, w), (max(2, round(h * 0.45)), max(1, round(w * 0.08))))

    @property
    def shape(self) -> tuple[int, int]:
        (h, w), (gr, gc) = self.tile, self.gap
        return (self.n_rows * (h + gr), self.n_cols * (w + gc) - gc)

    def origin(self, k: int) -> tuple[int, int]:
        """Top-left pixel of tile ``k`` inside the mosaic."""
        (h, w), (gr, gc) = self.tile, self.gap
        r, c = divmod(k, self.n_cols)
        return (r * (h + gr) + gr, c * (w + gc))

    def locate(self, row: int, col: int, n_tiles: int) -> tuple[int, int, int] | None:
        """``(tile, row, col)`` of a mosaic pixel, or ``None`` between tiles."""
        (h, w), (gr, gc) = self.tile, self.gap
        tr, r = divmod(row, h + gr)
        tc, c = divmod(col, w + gc)
        r -= gr
        if row < 0 or col < 0 or r < 0 or c >= w or tr >= self.n_rows or tc >= self.n_cols:
            return None
        k = tr * self.n_cols + tc
        return (k, r, c) if k < n_tiles else None

    def compose(self, tiles: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Mosaic image from ``tiles`` (K, H, W) or (K, H, W, 3)."""
        out = np.full((*self.shape, *tiles.shape[3:]), fill, dtype=np.float32)
        h, w = self.tile
        for k, tile in enumerate(tiles):
            r, c = self.origin(k)
            out[r : r + h, c : c + w] = tile
        return out


@dataclass
class PixelReport:
    """The genes in one pixel, with their expression, gene attribution and pixel saliency in one context."""

    row: int
    col: int
    #: what the expression values refer to, e.g. ``sample X (label Y)`` or ``mean of class Y``
    context: str
    #: columns ``channel, gene, expression, attribution, saliency``; largest ``|attribution|`` first
    #: (without attribution: highest saliency, then expression)
    table: pd.DataFrame

    @property
    def genes(self) -> list[str]:
        return list(self.table["gene"])

    def status(self, max_genes: int = 4) -> str:
        """One line for the status bar."""
        if self.table.empty:
            return f"({self.row}, {self.col}): no gene in this pixel"
        parts = []
        has_attribution = bool(np.isfinite(self.table["attribution"]).any())
        for channel, group in self.table.groupby("channel", sort=False):
            if has_attribution:
                names = [f"{g} {a:+.2f}" for g, a in zip(group["gene"][:max_genes], group["attribution"][:max_genes])]
            else:
                names = [f"{g} {e:.2f}" for g, e in zip(group["gene"][:max_genes],
                                                         group["expression"][:max_genes])]
            more = f" +{len(group) - max_genes} more" if len(group) > max_genes else ""
            prefix = f"{channel}: " if channel else ""
            parts.append(prefix + ", ".join(names) + more)
        saliency = self.table["saliency"].max()
        sal = "" if not np.isfinite(saliency) else f" | pixel saliency {saliency:.2f}"
        what = " (attribution)" if has_attribution else ""
        return f"{len(self.table)} gene(s){what}: " + " | ".join(parts) + sal + f" ({self.context})"

    def tooltip(self, max_genes: int = 12) -> str:
        """Several lines for the canvas tooltip: one gene per line."""
        lines = [f"pixel ({self.row}, {self.col}) · {self.context}"]
        if self.table.empty:
            return lines[0] + "\nno gene in this pixel"
        has_saliency = bool(np.isfinite(self.table["saliency"]).any())
        has_attribution = bool(np.isfinite(self.table["attribution"]).any())
        n = len(self.table)
        lines.append(f"{n} gene{'s' if n > 1 else ''}: expression (0–1)"
                     + (", gene attribution (+ for / − against the class explained)"
                        if has_attribution else "")
                     + (", pixel saliency (share of the image's maximum)" if has_saliency else ""))
        for rec in self.table.head(max_genes).itertuples():
            channel = f"[{rec.channel}] " if rec.channel else ""
            attr = (f"   attribution {rec.attribution:+.2f}"
                    if has_attribution and np.isfinite(rec.attribution) else "")
            sal = f"   saliency {rec.saliency:.2f}" if has_saliency and np.isfinite(rec.saliency) else ""
            lines.append(f"  {channel}{rec.gene}   {rec.expression:.2f}{attr}{sal}")
        if n > max_genes:
            lines.append(f"  … {n - max_genes} more (see the gene inspector)")
        return "\n".join(lines)


def pixel_genes(
    pixel_map: PixelMap,
    row: int,
    col: int,
    *,
    expression: np.ndarray | None = None,
    saliency: np.ndarray | None = None,
    attribution: np.ndarray | None = None,
    channel_names: tuple[str, ...] | list[str] | None = None,
) -> pd.DataFrame:
    """The genes drawn in pixel ``(row, col)`` of every channel.

    ``expression`` and ``attribution`` (signed gene attribution) are one value
    per gene (a sample, or a class mean); ``saliency`` a ``(C, H, W)`` map,
    whose value at the gene's pixel is the gene's pixel saliency (the same for
    all genes of the pixel).  Returns ``channel, gene, expression, attribution,
    saliency`` rows, largest ``|attribution|`` first (pixel-mates told apart),
    then highest saliency, then highest expression.
    """
    names = channel_names or ([""] if pixel_map.n_channels == 1 else [str(c) for c in range(pixel_map.n_channels)])
    frames = []
    for c in range(pixel_map.n_channels):
        idx = pixel_map.genes_at(c, row, col)
        if len(idx) == 0:
            continue
        expr = np.asarray(expression, dtype=float)[idx] if expression is not None else np.full(len(idx), np.nan)
        attr = np.asarray(attribution, dtype=float)[idx] if attribution is not None else np.full(len(idx), np.nan)
        sal = float(saliency[c, row, col]) if saliency is not None else np.nan
        frames.append(pd.DataFrame({"channel": names[c], "gene": pixel_map.genes[idx],
                                    "expression": expr, "attribution": attr, "saliency": sal}))
    if not frames:
        return pd.DataFrame({"channel": pd.Series(dtype=str), "gene": pd.Series(dtype=str),
                             "expression": pd.Series(dtype=float), "attribution": pd.Series(dtype=float),
                             "saliency": pd.Series(dtype=float)})
    table = pd.concat(frames, ignore_index=True)
    table["_magnitude"] = table["attribution"].abs()
    table = table.sort_values(["_magnitude", "saliency", "expression"], ascending=False, na_position="last",
                              kind="stable", ignore_index=True)
    return table.drop(columns="_magnitude")


@dataclass
class SaliencyView:
    """Gene attribution and pixel saliency of the loaded samples, and what the layers currently show."""

    #: pixel saliency method (the paper's maps)
    method: str
    #: ``(N, C, H, W)`` raw pixel saliency of every loaded sample (target: the model's predicted class)
    per_sample: np.ndarray
    #: the class each sample was explained for (the model's prediction)
    predicted: np.ndarray | None = None
    #: signed gene attribution of every loaded sample (:class:`~napari_omicsimage.attribution.GeneAttribution`,
    #: same targets); None for layouts without genes
    attribution: object = None
    #: class → indices of the samples averaged into its map
    class_members: dict[str, np.ndarray] = field(default_factory=dict)
    #: how class members were chosen
    grouping: str = ""
    #: ``None``: the layers follow the sample slider; else the class whose mean map is shown
    target_class: str | None = None

    def __post_init__(self):
        #: class → ``(C, H, W)`` mean pixel saliency over its members
        self.per_class = {name: self.per_sample[idx].mean(axis=0) for name, idx in self.class_members.items()
                          if len(idx)}
        #: class → ``(G,)`` mean signed gene attribution over its members
        self.per_class_attribution = {} if self.attribution is None else {
            name: self.attribution.values[idx].mean(axis=0) for name, idx in self.class_members.items() if len(idx)}

    @property
    def gene_method(self) -> str | None:
        return None if self.attribution is None else self.attribution.method

    @classmethod
    def from_predictions(cls, method: str, per_sample: np.ndarray, predicted, labels=None,
                         attribution=None) -> SaliencyView:
        """Group samples by class: correctly predicted ones when labels are known (the paper's
        class-level maps), else those predicted as the class."""
        predicted = np.asarray(predicted, dtype=object).astype(str)
        if labels is not None:
            labels = np.asarray(labels, dtype=object).astype(str)
            members = {c: np.flatnonzero((labels == c) & (predicted == c)) for c in sorted(set(labels))}
            grouping = "mean over the class's correctly predicted samples"
        else:
            members = {c: np.flatnonzero(predicted == c) for c in sorted(set(predicted))}
            grouping = "mean over the samples predicted as the class (no labels)"
        return cls(method, per_sample, predicted, attribution, members, grouping)


@dataclass
class ImageSet:
    """Everything the omicsimage layers show (one per imagified data set)."""

    images: np.ndarray  # (N, C, H, W) float32
    samples: list[str]
    labels: np.ndarray | None  # (N,) str
    expression: np.ndarray  # (N, G) preprocessed, in [0, 1]
    pixel_map: PixelMap | None  # None for layouts whose pixels are not genes
    description: str
    layout: object = None  # the fitted layout (gene tables go through napari_omicsimage.explain)
    label_column: str | None = None
    predictions: pd.DataFrame | None = None  # index = sample ids; columns predicted, prob_<class>
    saliency: SaliencyView | None = None
    #: the sample the viewer's slider is on (kept up to date by the napari session)
    current_sample: int = 0
    #: class means computed beforehand (:class:`~napari_omicsimage.streaming.lazy.ClassMeans`); required
    #: when ``images`` is a lazy (dask) stack, whose means come from a streaming pass, not from the stack
    class_means: object = None
    #: a sample of rendered images that sets the contrast of a lazy stack (None: the images themselves)
    preview: np.ndarray | None = None

    def __post_init__(self):
        self.samples = [str(s) for s in self.samples]
        self.lazy = is_lazy(self.images)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=object).astype(str)
            self.classes = [str(c) for c in sorted(set(self.labels))]
            if self.class_means is not None:
                if list(self.class_means.classes) != self.classes:
                    raise ValueError(f"class means for {self.class_means.classes}, labels of {self.classes}")
                self.class_images = np.asarray(self.class_means.images, dtype=np.float32)
                self.class_expression = np.asarray(self.class_means.expression, dtype=np.float32)
            elif self.lazy:
                raise ValueError("a lazy image stack needs its class means (streaming.lazy.class_means): "
                                 "averaging the stack would render every image")
            else:
                index = {c: i for i, c in enumerate(self.classes)}
                codes = np.array([index[v] for v in self.labels])
                self.class_images = np.stack([self.images[codes == k].mean(axis=0)
                                              for k in range(len(self.classes))])
                self.class_expression = np.stack([self.expression[codes == k].mean(axis=0)
                                                  for k in range(len(self.classes))])
            self.mosaic = Mosaic.for_classes(len(self.classes), self.shape)
        else:
            self.classes, self.class_images, self.class_expression, self.mosaic = [], None, None, None

    @classmethod
    def from_imagified(cls, result, label_column: str | None = None) -> ImageSet:
        """From :func:`~napari_omicsimage.pipeline.imagify` (in memory) or
        :func:`~napari_omicsimage.streaming.lazy.imagify_cells` (lazy stacks, streamed class means)."""
        layout = result.layout
        as_float = (lambda a: a) if is_lazy(result.images) else (lambda a: np.asarray(a, dtype=np.float32))
        return cls(
            images=as_float(result.images),
            samples=list(result.samples),
            labels=None if result.labels is None else result.labels.to_numpy(),
            expression=as_float(result.expression),
            pixel_map=layout.pixel_map_ if layout.has_gene_map else None,
            description=layout.describe(),
            layout=layout,
            label_column=label_column,
            class_means=getattr(result, "class_means", None),
            preview=getattr(result, "preview", None),
        )

    # ------------------------------------------------------------ geometry
    @property
    def n_samples(self) -> int:
        return self.images.shape[0]

    @property
    def n_channels(self) -> int:
        return self.images.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    @property
    def channel_names(self) -> list[str]:
        if self.n_channels == 1:
            return [""]
        if self.n_channels == 3:
            return list(RGB_NAMES)
        return [f"channel {c}" for c in range(self.n_channels)]

    def display_images(self) -> np.ndarray:
        """``(N, H, W)`` for one channel, ``(N, H, W, 3)`` RGB for three (napari's layouts); a lazy stack
        stays lazy."""
        return channels_last(self.images)

    @property
    def contrast_images(self) -> np.ndarray:
        """Images to choose contrast limits from: the preview of a lazy stack, else all images."""
        if self.lazy:
            return self.preview if self.preview is not None else np.asarray(self.images[: 256])
        return self.images

    # ------------------------------------------------------------- samples
    def sample_caption(self, i: int) -> str:
        """Two lines for the text overlay: ``sample 3/700: id`` and ``label · predicted``."""
        i = int(np.clip(i, 0, self.n_samples - 1))
        first = f"sample {i + 1}/{self.n_samples}: {self.samples[i]}"
        parts = []
        if self.labels is not None:
            parts.append(f"{self.label_column or 'label'}: {self.labels[i]}")
        pred = self.prediction(i)
        if pred is not None:
            label, prob = pred
            mark = "" if self.labels is None else ("  ✓" if label == self.labels[i] else "  ✗")
            split = self.predictions.loc[self.samples[i]].get("split") if "split" in self.predictions else None
            parts.append(f"predicted: {label} ({prob:.2f}){mark}" + (f"  [{split}]" if split else ""))
        return "\n".join([first, *parts])

    def prediction(self, i: int) -> tuple[str, float] | None:
        if self.predictions is None or self.samples[i] not in self.predictions.index:
            return None
        row = self.predictions.loc[self.samples[i]]
        label = str(row["predicted"])
        prob = row.get(f"prob_{label}", np.nan)
        return label, float(prob)

    def sample_expression(self, i: int) -> np.ndarray:
        """``(G,)`` preprocessed expression of sample ``i`` (read and preprocessed now for a lazy stack)."""
        return np.asarray(self.expression[int(i)], dtype=np.float32)

    # ------------------------------------------------------------ saliency
    def saliency_for_sample(self, i: int) -> np.ndarray | None:
        """``(C, H, W)`` saliency of sample ``i``, relative to its maximum (so in [0, 1])."""
        if self.saliency is None:
            return None
        return relative(self.saliency.per_sample[i])

    def saliency_for_class(self, name: str) -> np.ndarray | None:
        """``(C, H, W)`` mean saliency of a class, relative to its maximum."""
        if self.saliency is None or name not in self.saliency.per_class:
            return None
        return relative(self.saliency.per_class[name])

    def attribution_for_sample(self, i: int) -> np.ndarray | None:
        """``(G,)`` signed gene attribution of sample ``i`` (for its predicted class), or None."""
        if self.saliency is None or self.saliency.attribution is None:
            return None
        return self.saliency.attribution.values[i]

    def attribution_for_class(self, name: str) -> np.ndarray | None:
        """``(G,)`` mean signed gene attribution of a class's members, or None."""
        if self.saliency is None:
            return None
        return self.saliency.per_class_attribution.get(name)

    def attribution_context(self, sample: int | None = None) -> np.ndarray | None:
        """The gene attribution of what is shown now: the class mean or the slider's sample (see :meth:`context`)."""
        target = self.saliency.target_class if self.saliency is not None else None
        if target is not None:
            return self.attribution_for_class(target)
        i = int(np.clip(self.current_sample if sample is None else sample, 0, self.n_samples - 1))
        return self.attribution_for_sample(i)

    def attribution_image(self, attribution: np.ndarray) -> np.ndarray:
        """``(H, W)``: each pixel the summed signed attribution of its genes.

        A gene drawn in several channels (RGB layouts) puts an equal share in
        each of its pixels, so the image sums to the sample's total attribution.
        """
        pixel_map = self.pixel_map
        placed = pixel_map.flat >= 0  # (C, G)
        shares = np.asarray(attribution, dtype=np.float64) / np.maximum(placed.sum(axis=0), 1)
        image = np.zeros(pixel_map.n_channels * self.shape[0] * self.shape[1])
        channel, gene = np.nonzero(placed)
        np.add.at(image, pixel_map.flat[channel, gene], shares[gene])
        return image.reshape(pixel_map.n_channels, *self.shape).sum(axis=0).astype(np.float32)

    def context(self, sample: int | None = None) -> tuple[np.ndarray | None, np.ndarray, str]:
        """``(saliency (C, H, W) relative or None, expression (G,), description)`` of what is shown.

        The saliency layer shows either the slider's sample or one class's mean
        map; region tables and exports use the same values.
        """
        target = self.saliency.target_class if self.saliency is not None else None
        if target is not None:
            k = self.classes.index(target)
            return self.saliency_for_class(target), self.class_expression[k], f"mean of class {target}"
        i = int(np.clip(self.current_sample if sample is None else sample, 0, self.n_samples - 1))
        label = f" ({self.labels[i]})" if self.labels is not None else ""
        return self.saliency_for_sample(i), self.sample_expression(i), f"sample {self.samples[i]}{label}"

    def gene_table(self) -> pd.DataFrame:
        """Every gene ranked by the gene attribution shown now (a sample, or a class mean).

        Uses :func:`napari_omicsimage.explain.gene_table`: ranked by
        ``|attribution|`` (sign kept), the relative pixel saliency beside it.
        Without a computed explanation, genes are ranked by expression.  The
        ``shown`` column says which sample or class.
        """
        if self.pixel_map is None:
            raise OmicsInputError("these images have no gene map (published RGB method): no gene table.")
        saliency, expression, context = self.context()
        if saliency is None or self.layout is None:
            table = pd.DataFrame({"gene": self.pixel_map.genes, "expression": expression})
            table = table.sort_values("expression", ascending=False, kind="stable", ignore_index=True)
            table.insert(0, "rank", np.arange(1, len(table) + 1))
        else:
            table = gene_table(self.layout, saliency, expression, attribution=self.attribution_context())
            names = np.asarray(self.channel_names, dtype=object)
            table["channel"] = np.where(table["channel"] >= 0, names[np.maximum(table["channel"], 0)], "")
        table.insert(0, "shown", context)
        return table

    def region_table(self, masks: dict, sample: int | None = None) -> pd.DataFrame:
        """Genes inside each region mask, with the values shown now; the ``values of`` column says whose
        (``sample X (label)`` or ``mean of class Y``), so an exported table tells the two apart."""
        from ._regions import region_gene_table

        saliency, expression, context = self.context(sample)
        table = region_gene_table(self.pixel_map, masks, saliency=saliency, expression=expression,
                                  attribution=self.attribution_context(sample), channel_names=self.channel_names)
        table.insert(0, "values of", context)
        return table

    # --------------------------------------------------------------- hover
    def report(self, role: str, row: float, col: float, sample: int | None = None) -> PixelReport | None:
        """Genes at a pixel of the layer with ``role``; ``None`` off the image or without a gene map.

        ``row, col`` are the layer's data coordinates (for the class-means
        mosaic, mosaic pixels); ``sample`` is the sample slider position.
        """
        if self.pixel_map is None:
            return None
        row, col = int(np.rint(row)), int(np.rint(col))
        h, w = self.shape
        if role == "class-means":
            if self.mosaic is None:
                return None
            hit = self.mosaic.locate(row, col, len(self.classes))
            if hit is None:
                return None
            k, row, col = hit
            name = self.classes[k]
            context = f"mean of class {name}"
            expression = self.class_expression[k]
            saliency = self.saliency_for_class(name)
            attribution = self.attribution_for_class(name)
        else:
            if not (0 <= row < h and 0 <= col < w):
                return None
            shown_class = self.saliency.target_class if self.saliency is not None else None
            if role in ("saliency", "attribution") and shown_class is not None:
                saliency, expression, context = self.context()
                attribution = self.attribution_context()
            else:
                # the sample's own saliency, even while the saliency layer shows a class mean
                i = int(np.clip(self.current_sample if sample is None else sample, 0, self.n_samples - 1))
                label = f" ({self.labels[i]})" if self.labels is not None else ""
                context = f"sample {self.samples[i]}{label}"
                expression = self.sample_expression(i)
                saliency = self.saliency_for_sample(i)
                attribution = self.attribution_for_sample(i)
        table = pixel_genes(self.pixel_map, row, col, expression=expression, saliency=saliency,
                            attribution=attribution, channel_names=self.channel_names)
        return PixelReport(row, col, context, table)


def relative(saliency: np.ndarray) -> np.ndarray:
    """Saliency divided by its maximum: attributions have arbitrary units, fractions compare."""
    saliency = np.asarray(saliency, dtype=np.float32)
    top = float(saliency.max()) if saliency.size else 0.0
    return saliency / top if top > 0 else np.zeros_like(saliency)


def channels_last(images: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` → ``(N, H, W)`` (one channel) or ``(N, H, W, C)``; a dask array stays lazy."""
    if not hasattr(images, "ndim"):
        images = np.asarray(images)
    if images.shape[1] == 1:
        return images[:, 0]
    return np.moveaxis(images, 1, -1)
