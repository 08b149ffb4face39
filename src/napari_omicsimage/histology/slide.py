"""Slides: H&E images read whole (JPEG/PNG) or lazily (pyramidal TIFF, SVS).

A :class:`Slide` answers three questions without caring about the file
format: how big is level 0 (``shape``), what are the pixels of a region
(``read_region``), and which arrays make a napari multiscale image
(``levels``).

* JPEG / PNG / plain TIFF go through PIL and are decoded once into memory
  (their codecs cannot decode a region).  PIL refuses images over ~179
  megapixels as a guard against decompression bombs; whole-slide JPEGs are
  that large, so the guard is lifted for the one file the user named and
  restored right after.
* Pyramidal / tiled TIFF and Aperio ``.svs`` open lazily through tifffile's
  zarr store: only the tiles a region touches are decoded.  openslide-python
  is used for the formats tifffile cannot read (``.ndpi``, ``.mrxs``, ...)
  when it is installed.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import OmicsInputError

#: suffixes read lazily (tifffile); anything else PIL can open is decoded whole
LAZY_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".ome.tif", ".ome.tiff")
#: formats only openslide reads
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")
#: napari gets pyramid levels down to about this side
SMALLEST_LEVEL_SIDE = 1024


@contextmanager
def _pil_size_guard_lifted():
    """PIL's decompression-bomb guard off for one call: the user named this file, and slides are big."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class Slide:
    """An RGB slide image; level 0 is full resolution, ``levels`` go down by powers of two."""

    def __init__(self, path, levels: list, *, backend: str, um_per_px: float | None = None,
                 closer=None):
        self.path = Path(path)
        self.levels = levels
        self.backend = backend
        #: µm per level-0 pixel found in the file's metadata (None when the file does not say)
        self.um_per_px = um_per_px
        self._closer = closer

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Level-0 pixels ``[y0:y0+height, x0:x0+width]`` as ``(height, width, 3)`` uint8.

        Parts outside the slide are white (the colour of glass), so a patch at
        the edge keeps its physical size.
        """
        h, w = self.shape
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + height, h), min(x0 + width, w)
        if ye > ys and xe > xs:
            region = np.asarray(self.levels[0][ys:ye, xs:xe])
            out[ys - y0:ye - y0, xs - x0:xe - x0] = _as_rgb(region)
        return out

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """A small RGB copy and its scale (thumbnail pixels per level-0 pixel)."""
        from PIL import Image

        h, w = self.shape
        # the smallest level that is still at least max_side wide, then PIL for the last step
        level = self.levels[0]
        for candidate in self.levels:
            if max(candidate.shape[:2]) >= max_side:
                level = candidate
        array = _as_rgb(np.asarray(level[:]))
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        thumb = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR))
        return thumb, size[0] / w

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __repr__(self) -> str:
        h, w = self.shape
        return f"Slide({self.path.name}, {w}×{h} px, {len(self.levels)} levels, {self.backend})"


def _as_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:  # RGBA: alpha is not tissue
        array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255:
            array = (array / (np.iinfo(array.dtype).max / 255.0)).round()
        array = np.clip(array, 0, 255).astype(np.uint8)
    return array


def _halvings(array: np.ndarray) -> list[np.ndarray]:
    """``array`` and its 2× reductions down to about :data:`SMALLEST_LEVEL_SIDE` (for napari)."""
    from PIL import Image

    levels = [array]
    image = Image.fromarray(array)
    while max(image.size) > SMALLEST_LEVEL_SIDE:
        image = image.reduce(2)
        levels.append(np.asarray(image))
    return levels


def open_slide(path) -> Slide:
    """Open an H&E image; lazily when the format allows it.  Errors are one-line :class:`OmicsInputError`."""
    path = Path(path)
    if not path.is_file():
        raise OmicsInputError(f"image {path} does not exist; give the path of the H&E image.")
    name = path.name.lower()
    if name.endswith(OPENSLIDE_SUFFIXES):
        return _open_openslide(path)
    if name.endswith(LAZY_SUFFIXES):
        return _open_tiff(path)
    return _open_pil(path)


def _open_pil(path: Path) -> Slide:
    from PIL import Image, UnidentifiedImageError

    try:
        with _pil_size_guard_lifted(), Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not in the middle of a run
            array = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise OmicsInputError(f"{path} is not an image PIL can read (JPEG, PNG, TIFF); check the file.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise OmicsInputError(f"{path} could not be decoded ({exc}); the file is truncated or damaged.") from exc
    return Slide(path, _halvings(array), backend="PIL (decoded into memory)")


def _tiff_um_per_px(tif) -> float | None:
    """µm per pixel from Aperio's ``MPP =`` or the TIFF resolution tags, when the file states them."""
    page = tif.pages[0]
    match = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        numerator, denominator = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = numerator / denominator if denominator else 0
        if per_unit > 0 and unit in (2, 3):  # 2: inch, 3: centimetre; 1 (none) says nothing
            return (25400.0 if unit == 2 else 10000.0) / per_unit
    return None


def _open_tiff(path: Path) -> Slide:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise OmicsInputError(f"{path} is not a readable TIFF ({exc}); the file is truncated or damaged.") from exc
    try:
        series = tif.series[0]
        levels = []
        for index in range(len(series.levels)):
            store = series.aszarr(level=index)
            levels.append(zarr.open(store, mode="r"))
        if levels[0].ndim != 3 or levels[0].shape[2] not in (3, 4):
            raise OmicsInputError(f"{path}: the first image series has shape {levels[0].shape}; "
                                  "an RGB slide (height, width, 3) is needed.")
        # touch the last tile of level 0: a truncated file fails now instead of mid-run
        np.asarray(levels[0][-1:, -1:])
        um = _tiff_um_per_px(tif)
    except OmicsInputError:
        tif.close()
        raise
    except Exception as exc:  # codecs raise many types for damaged data
        tif.close()
        raise OmicsInputError(f"{path} could not be decoded ({type(exc).__name__}: {exc}); "
                              "the file is truncated or damaged.") from exc
    return Slide(path, levels, backend="tifffile (lazy)", um_per_px=um, closer=tif.close)


class _OpenSlideLevel:
    """Array-like view of one openslide level (enough for napari and :meth:`Slide.read_region`)."""

    def __init__(self, handle, level: int):
        self.handle, self.level = handle, level
        width, height = handle.level_dimensions[level]
        self.shape = (height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = handle.level_downsamples[level]

    def __getitem__(self, key):
        rows, cols = (key + (slice(None),) * 2)[:2] if isinstance(key, tuple) else (key, slice(None))
        y0, y1, _ = rows.indices(self.shape[0])
        x0, x1, _ = cols.indices(self.shape[1])
        d = self.downsample
        region = self.handle.read_region((int(x0 * d), int(y0 * d)), self.level, (x1 - x0, y1 - y0))
        return np.asarray(region.convert("RGB"))

    def __array__(self, dtype=None, copy=None):
        return self[:, :]


def _open_openslide(path: Path) -> Slide:
    try:
        import openslide
    except ImportError as exc:
        raise OmicsInputError(f"{path.suffix} slides need openslide-python (pip install openslide-python "
                              "openslide-bin), or convert the slide to a pyramidal TIFF.") from exc
    try:
        handle = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise OmicsInputError(f"{path} could not be opened by openslide ({exc}).") from exc
    levels = [_OpenSlideLevel(handle, i) for i in range(handle.level_count)]
    mpp = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
    return Slide(path, levels, backend="openslide (lazy)", um_per_px=float(mpp) if mpp else None,
                 closer=handle.close)
