"""Sections: one slide, its spots (centres in slide pixels), their counts, and the physical scale.

Four inputs become a :class:`Section`:

* a **legacy Spatial Transcriptomics folder** (her2st layout): one image,
  ``counts_spots_by_genes.tsv[.gz]`` (rows are spots named ``XxY`` in array
  coordinates) and ``spot_selection.tsv`` (columns ``x y ... pixel_x pixel_y
  selected``);
* a **Space Ranger output folder** (read with ``scanpy.read_visium``) plus the
  full-resolution image given beside it; without one, Space Ranger's own
  ``tissue_hires_image.png`` is used at its scale factor (and that is said);
* an **``.h5ad``** with spot centres in ``obsm['spatial']`` (image pixels) and
  ``--image FILE``;
* a **bare image** (no spots): a tile grid over the detected tissue is made
  later (:func:`napari_omicsimage.histology.tiles.tile_grid`); prediction only.

The scale (µm per pixel) comes, in this order, from the user, the slide's
metadata, the spot diameter in pixels (with the platform's physical spot
diameter), or the spot pitch (median distance to the nearest spot, with the
platform's centre-to-centre distance).  ``Section.notes`` says which.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import OmicsInputError
from .slide import Slide, open_slide
from .tiles import DEFAULT_PATCH_UM, tile_grid

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".btf", ".ndpi", ".mrxs", ".scn", ".bif")
#: physical spot diameter and centre-to-centre distance of each platform, in µm
PLATFORMS = {
    "legacy-st": {"spot_diameter_um": 100.0, "spot_pitch_um": 200.0},
    "visium": {"spot_diameter_um": 55.0, "spot_pitch_um": 100.0},
}


@dataclass
class Scale:
    """What the user said about the physical scale (all optional)."""

    um_per_px: float | None = None
    spot_diameter_px: float | None = None
    spot_diameter_um: float | None = None
    spot_pitch_um: float | None = None

    def validate(self) -> Scale:
        for name in ("um_per_px", "spot_diameter_px", "spot_diameter_um", "spot_pitch_um"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise OmicsInputError(f"--{name.replace('_', '-')} must be a positive number, got {value}.")
        return self


@dataclass
class Section:
    """One tissue section: slide, spot centres (level-0 pixels) and, when measured, raw counts."""

    name: str
    slide: Slide
    #: index = spot ids; columns ``x``, ``y`` (level-0 pixels of ``slide``)
    spots: pd.DataFrame
    um_per_px: float
    spot_diameter_px: float
    #: spots × genes, obs_names equal to ``spots.index``; None when the section has no expression
    counts: ad.AnnData | None = None
    #: ``"counts"`` (raw: normalise + log1p) or ``"log1p"`` (already log-normalised)
    counts_scale: str = "counts"
    kind: str = "spots"
    source: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_spots(self) -> int:
        return len(self.spots)

    @property
    def centres(self) -> np.ndarray:
        """``(n, 2)`` float array of ``(x, y)`` level-0 pixels."""
        return self.spots[["x", "y"]].to_numpy(dtype=np.float64)

    def describe(self) -> str:
        h, w = self.slide.shape
        genes = f", {self.counts.n_vars} genes" if self.counts is not None else ", no expression"
        return (f"{self.name}: {w}×{h} px slide, {self.n_spots} {self.kind}{genes}, "
                f"{self.um_per_px:.3f} µm/px, spot {self.spot_diameter_px:.0f} px")


# ----------------------------------------------------------------- dispatch
def read_section(path, *, image=None, scale: Scale | None = None, require_counts: bool = True,
                 name: str | None = None) -> Section:
    """Read one section from a folder, an ``.h5ad`` (+ ``image``) or a bare image file."""
    path = Path(path)
    scale = (scale or Scale()).validate()
    if not path.exists():
        raise OmicsInputError(f"section {path} does not exist; give a folder, an .h5ad or an image.")
    if path.is_dir():
        if (path / "spatial").is_dir():
            section = read_spaceranger(path, image=image, scale=scale)
        elif list(path.glob("spot_selection*.tsv*")) or list(path.glob("*counts*.tsv*")):
            section = read_legacy_st(path, image=image, scale=scale)
        else:
            raise OmicsInputError(
                f"{path} is neither a legacy ST folder (image + counts_spots_by_genes.tsv.gz + "
                "spot_selection.tsv) nor a Space Ranger folder (with spatial/); check the folder.")
    elif path.suffix == ".h5ad":
        section = read_h5ad_section(path, image=image, scale=scale)
    elif path.name.lower().endswith(IMAGE_SUFFIXES):
        section = read_bare_slide(path, scale=scale)
    else:
        raise OmicsInputError(f"{path}: unknown section type; give a legacy ST or Space Ranger folder, "
                              "an .h5ad with obsm['spatial'] (and --image), or a slide image.")
    if name:
        section.name = name
    if require_counts and section.counts is None:
        raise OmicsInputError(f"{path} holds no expression; fitting and evaluation need measured spots.")
    check_spots_inside(section)
    return section


def _single_image(folder: Path, image) -> Path:
    if image is not None:
        return Path(image)
    found = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if len(found) != 1:
        raise OmicsInputError(f"{folder} holds {len(found)} images ({[p.name for p in found][:4]}); "
                              "exactly one is needed, or name it with --image.")
    return found[0]


def check_spots_inside(section: Section) -> None:
    h, w = section.slide.shape
    xy = section.centres
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    if outside.any():
        first = section.spots.index[np.flatnonzero(outside)[0]]
        x, y = xy[outside][0]
        raise OmicsInputError(
            f"{section.name}: {int(outside.sum())} of {len(xy)} spot centres lie outside the {w}×{h} px image "
            f"(e.g. {first} at x={x:.0f}, y={y:.0f}); the positions belong to another image or resolution: "
            "give the full-resolution image (--image) the positions were measured on.")


# ------------------------------------------------------------------ scale
def _nearest_spot_distance(xy: np.ndarray) -> float | None:
    if len(xy) < 2:
        return None
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(distances[:, 1]))


def resolve_scale(scale: Scale, *, slide: Slide, xy: np.ndarray, platform: str | None,
                  known_spot_diameter_px: float | None = None, known_pitch_px: float | None = None
                  ) -> tuple[float, float, str]:
    """``(µm per px, spot diameter in px, how it was found)``; a clear error when nothing tells."""
    defaults = PLATFORMS.get(platform or "", {})
    spot_um = scale.spot_diameter_um or defaults.get("spot_diameter_um")
    pitch_um = scale.spot_pitch_um or defaults.get("spot_pitch_um")
    diameter_px = scale.spot_diameter_px or known_spot_diameter_px
    if scale.um_per_px is not None:
        um, how = scale.um_per_px, f"{scale.um_per_px:.4g} µm/px as given"
    elif slide.um_per_px is not None:
        um, how = slide.um_per_px, f"{slide.um_per_px:.4g} µm/px from the slide's metadata"
    elif diameter_px is not None and spot_um is not None:
        um = spot_um / diameter_px
        how = f"{um:.4g} µm/px derived from the spot diameter ({diameter_px:.1f} px = {spot_um:g} µm)"
    elif pitch_um is not None and known_pitch_px is not None:
        um = pitch_um / known_pitch_px
        how = (f"{um:.4g} µm/px derived from the spot pitch (one array step = {known_pitch_px:.1f} px, fitted "
               f"on the array coordinates, = {pitch_um:g} µm centre to centre)")
    elif pitch_um is not None and (pitch := _nearest_spot_distance(xy)) is not None:
        um = pitch_um / pitch
        how = (f"{um:.4g} µm/px derived from the spot pitch (median nearest-spot distance {pitch:.1f} px "
               f"= {pitch_um:g} µm centre to centre)")
    else:
        raise OmicsInputError(
            "missing scale: nothing says how many µm a pixel is; give --um-per-px, or --spot-diameter-px "
            "with --spot-diameter-um, or --spot-pitch-um (centre-to-centre distance of the spots).")
    if diameter_px is None:
        diameter_px = (spot_um / um) if spot_um is not None else 55.0 / um
    return float(um), float(diameter_px), how


# --------------------------------------------------------------- readers
def _array_step_px(selection: pd.DataFrame) -> float | None:
    """Pixels per array step: least-squares slope of pixel centres on (adjusted) array coordinates."""
    if len(selection) < 3:
        return None
    cx, cy = ("new_x", "new_y") if {"new_x", "new_y"} <= set(selection.columns) else ("x", "y")
    slopes = []
    for array_column, pixel_column in ((cx, "pixel_x"), (cy, "pixel_y")):
        a = selection[array_column].to_numpy(dtype=float)
        if np.ptp(a) > 0:
            slopes.append(abs(np.polyfit(a, selection[pixel_column].to_numpy(dtype=float), 1)[0]))
    return float(np.mean(slopes)) if slopes else None


def read_legacy_st(folder: Path, *, image=None, scale: Scale | None = None) -> Section:
    """A her2st-style folder: image, ``counts_spots_by_genes.tsv.gz``, ``spot_selection.tsv``."""
    scale = scale or Scale()
    counts_files = sorted(folder.glob("*counts*.tsv*"))
    selection_files = sorted(folder.glob("spot_selection*.tsv*"))
    if len(counts_files) != 1 or len(selection_files) != 1:
        raise OmicsInputError(f"{folder}: a legacy ST folder needs one counts table (*counts*.tsv[.gz]) and one "
                              f"spot_selection.tsv; found {len(counts_files)} and {len(selection_files)}.")
    try:
        selection = pd.read_csv(selection_files[0], sep="\t")
        counts = pd.read_csv(counts_files[0], sep="\t", index_col=0)
    except (OSError, ValueError, EOFError) as exc:
        raise OmicsInputError(f"{folder}: could not read the tables ({exc}).") from exc
    needed = {"x", "y", "pixel_x", "pixel_y"}
    if not needed <= set(selection.columns):
        raise OmicsInputError(f"{selection_files[0]} lacks columns {sorted(needed - set(selection.columns))}; "
                              "it needs x, y (array coordinates) and pixel_x, pixel_y (image pixels).")
    if "selected" in selection.columns:
        selection = selection[selection["selected"].astype(int) == 1]
    selection.index = pd.Index(selection["x"].astype(int).astype(str) + "x" + selection["y"].astype(int).astype(str))
    counts.index = counts.index.astype(str)
    spot_ids = counts.index
    unmatched = spot_ids.difference(selection.index)
    if len(unmatched):
        raise OmicsInputError(
            f"{folder.name}: {len(unmatched)} of {len(spot_ids)} spots in {counts_files[0].name} have no "
            f"position in {selection_files[0].name} (e.g. {list(unmatched[:3])}); spot ids must be 'XxY' "
            "array coordinates matching the x, y columns of the selected spots.")
    notes = []
    no_counts = selection.index.difference(spot_ids)
    if len(no_counts):
        notes.append(f"{len(no_counts)} selected spot position(s) have no counts and are left out")
    spots = pd.DataFrame({"x": selection.loc[spot_ids, "pixel_x"].to_numpy(dtype=float),
                          "y": selection.loc[spot_ids, "pixel_y"].to_numpy(dtype=float)}, index=spot_ids)
    slide = open_slide(_single_image(folder, image))
    um, diameter, how = resolve_scale(scale, slide=slide, xy=spots.to_numpy(), platform="legacy-st",
                                      known_pitch_px=_array_step_px(selection))
    notes.append(how)
    import scipy.sparse as sp

    adata = ad.AnnData(X=sp.csr_matrix(counts.to_numpy(dtype=np.float32)),
                       obs=pd.DataFrame(index=spot_ids), var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.var_names_make_unique()
    return Section(folder.name, slide, spots, um, diameter, counts=adata, counts_scale="counts",
                   kind="spots", source=folder, notes=notes)


def read_spaceranger(folder: Path, *, image=None, scale: Scale | None = None) -> Section:
    """A Space Ranger output folder; positions are full-resolution pixels, so give that image."""
    import scanpy as sc

    scale = scale or Scale()
    matrices = [name for name in ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")
                if (folder / name).is_file()]
    if not matrices:
        raise OmicsInputError(f"{folder}: no filtered_feature_bc_matrix.h5 in this Space Ranger folder.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy; the reader is the same
            adata = sc.read_visium(folder, count_file=matrices[0])
    except (OSError, KeyError, ValueError) as exc:
        raise OmicsInputError(f"{folder}: scanpy could not read this Space Ranger folder ({exc}).") from exc
    adata.var_names_make_unique()
    library = next(iter(adata.uns["spatial"]))
    factors = adata.uns["spatial"][library]["scalefactors"]
    xy_full = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    notes = []
    if image is not None:
        slide = open_slide(image)
        image_scale = 1.0
    else:
        hires = folder / "spatial" / "tissue_hires_image.png"
        if not hires.is_file():
            raise OmicsInputError(f"{folder}: give the full-resolution H&E with --image (no hires image here).")
        slide = open_slide(hires)
        image_scale = float(factors["tissue_hires_scalef"])
        notes.append(f"no --image given: using Space Ranger's tissue_hires_image.png at {image_scale:g}× the "
                     "full resolution; patches are coarse, give the full-resolution image for real use")
    diameter_full = float(factors["spot_diameter_fullres"])
    spots = pd.DataFrame(xy_full * image_scale, columns=["x", "y"], index=adata.obs_names.astype(str))
    um, diameter, how = resolve_scale(scale, slide=slide, xy=spots.to_numpy(), platform="visium",
                                      known_spot_diameter_px=diameter_full * image_scale)
    notes.append(how)
    counts = ad.AnnData(X=adata.X, obs=pd.DataFrame(index=spots.index), var=adata.var[[]].copy())
    return Section(folder.name, slide, spots, um, diameter, counts=counts, counts_scale="counts",
                   kind="spots", source=folder, notes=notes)


def _values_are_counts(x) -> bool:
    import scipy.sparse as sp

    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = values[: 100_000]
    return bool(values.size == 0 or (np.all(values >= 0) and np.allclose(values, np.round(values))))


def read_h5ad_section(path: Path, *, image=None, scale: Scale | None = None) -> Section:
    """An ``.h5ad`` with ``obsm['spatial']`` (pixels of ``image``) and raw or log-normalised expression."""
    scale = scale or Scale()
    if image is None:
        raise OmicsInputError(f"{path}: an .h5ad section needs the H&E image its obsm['spatial'] refers to "
                              "(--image FILE).")
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise OmicsInputError(f"{path} is not a readable .h5ad ({exc}).") from exc
    if "spatial" not in adata.obsm:
        raise OmicsInputError(f"{path} has no obsm['spatial'] (spot centres in image pixels).")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    spots = pd.DataFrame(xy, columns=["x", "y"], index=adata.obs_names.astype(str))
    known_diameter = None
    for library in (adata.uns.get("spatial") or {}).values():
        factors = library.get("scalefactors", {}) if isinstance(library, dict) else {}
        if "spot_diameter_fullres" in factors:
            known_diameter = float(factors["spot_diameter_fullres"])
    slide = open_slide(image)
    platform = "visium" if known_diameter is not None else None
    um, diameter, how = resolve_scale(scale, slide=slide, xy=xy, platform=platform,
                                      known_spot_diameter_px=known_diameter)
    notes = [how]
    if "counts" in adata.layers:
        x, counts_scale = adata.layers["counts"], "counts"
        notes.append("expression from layers['counts'] (raw counts)")
    elif _values_are_counts(adata.X):
        x, counts_scale = adata.X, "counts"
    else:
        x, counts_scale = adata.X, "log1p"
        notes.append("X holds non-integer values: taken as already log1p-normalised (not normalised again)")
    counts = ad.AnnData(X=x, obs=pd.DataFrame(index=spots.index), var=pd.DataFrame(index=adata.var_names))
    return Section(path.stem, slide, spots, um, diameter, counts=counts, counts_scale=counts_scale,
                   kind="spots", source=path, notes=notes)


def read_bare_slide(path: Path, *, scale: Scale | None = None) -> Section:
    """A slide without spots: the spots become a tile grid over the tissue (prediction only)."""
    scale = scale or Scale()
    slide = open_slide(path)
    if scale.um_per_px is None and slide.um_per_px is None:
        raise OmicsInputError(f"missing scale: {path.name} does not say how many µm a pixel is; give --um-per-px.")
    um = scale.um_per_px or slide.um_per_px
    how = f"{um:.4g} µm/px " + ("as given" if scale.um_per_px else "from the slide's metadata")
    spots, note = tile_grid(slide, um_per_px=um, tile_um=DEFAULT_PATCH_UM)
    return Section(path.stem, slide, spots, um, DEFAULT_PATCH_UM / um, counts=None, kind="tiles",
                   source=path, notes=[how, note])


def section_inputs(section: Section) -> list[Path]:
    """Files a command read for this section (so outputs never replace them)."""
    paths = [section.slide.path]
    if section.source is not None:
        paths.append(section.source)
    return paths

