"""Reading expression data into AnnData, with labels, and checking it.

Everything downstream takes an :class:`anndata.AnnData` with samples in rows
(``obs``) and genes in columns (``var``), a dense or sparse numeric ``X`` and the
class labels in an ``obs`` column.  This module is the one place that turns the
many shapes users bring (h5ad, CSV/TSV in either orientation, 10x) into that.
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import OmicsInputError

log = logging.getLogger(__name__)

Orientation = Literal["auto", "genes-in-rows", "samples-in-rows"]

#: The sample data bundled with scanpy, usable offline.
SAMPLE_DATASETS = {"pbmc68k_reduced": "bulk_labels"}

_GENE_ID_PATTERN = re.compile(
    r"^(ENS[A-Z]*G\d+|\d+_(s_|x_|i_|f_|g_|r_)?at|[A-Z0-9]+_at|AFFX-)", re.IGNORECASE
)


@dataclass
class OrientationDecision:
    """Which axis of a table held the genes, and why we think so."""

    genes_in_rows: bool
    reason: str

    def describe(self) -> str:
        where = "rows" if self.genes_in_rows else "columns"
        return f"genes detected in {where} ({self.reason})"


# --------------------------------------------------------------------- reading
def read_expression(
    path: str | Path,
    *,
    orientation: Orientation = "auto",
    labels: str | Path | pd.DataFrame | pd.Series | None = None,
    label_column: str | None = None,
    sample_column: str | None = None,
) -> ad.AnnData:
    """Read an expression file into an AnnData (samples × genes).

    Parameters
    ----------
    path
        ``.h5ad``; ``.csv``/``.tsv``/``.txt`` (optionally ``.gz``); a 10x ``.h5``;
        a 10x ``matrix.mtx[.gz]`` file or the folder holding it.
    orientation
        For tables: ``"auto"`` detects whether genes are in rows or columns and
        records what it decided in ``adata.uns["omicsimage"]["orientation"]``;
        ``"genes-in-rows"`` / ``"samples-in-rows"`` override the detection.
    labels
        Optional table (path or DataFrame/Series) with one row per sample, joined
        on sample id. Its first column (or ``sample_column``) holds the ids.
    label_column
        The column holding the class labels, in ``labels`` or, without a labels
        table, in ``adata.obs``. In a labels file it may be given by position,
        ``"#N"`` (``"#1"`` the first column; also for ``sample_column``). The
        labels are checked (no missing ones — ``NA``, ``NaN`` and empty cells are
        missing — no unknown samples, at least two classes).

    What was decided about the file (compression, separator, encoding when they
    differ from its name; orientation) is in ``adata.uns["omicsimage"]`` and
    :func:`reading_notes` returns it as lines to show the user.
    """
    path = Path(path)
    if not path.exists():
        raise OmicsInputError(f"{path}: no such file or folder. Check the path and try again.")
    kind = _file_kind(path)
    notes: list[str] = []
    labels_frame = None
    if kind in ("h5ad", "10x-h5"):
        adata = _read_hdf5(path, kind)
        note = "h5ad files store samples in rows" if kind == "h5ad" else "10x files store cells in rows"
    elif kind == "table":
        frame = _read_table(path, notes)
        if labels is not None:  # before the orientation, which the label ids help decide
            labels_frame, label_column = _read_labels(labels, sample_column, label_column, notes,
                                                      frame.index.union(frame.columns))
        decision = _decide_orientation(frame, orientation, labels_frame)
        adata = _frame_to_anndata(frame, decision.genes_in_rows)
        note = decision.describe()
        log.info("%s: %s", path.name, note)
    else:  # 10x matrix.mtx folder
        adata = _read_10x_folder(path if path.is_dir() else path.parent)
        note = "10x files store cells in rows"
    adata.uns["omicsimage"] = {"source": str(path), "orientation": note, "reading": notes}
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    validate_matrix(adata)
    if labels is not None and labels_frame is None:
        labels_frame, label_column = _read_labels(labels, sample_column, label_column, notes, adata.obs_names)
    if labels_frame is not None:
        attach_labels(adata, labels_frame, label_column)
    elif label_column is not None:
        check_labels(adata, label_column)
    return adata


def load_sample_data(name: str = "pbmc68k_reduced") -> ad.AnnData:
    """Load a data set bundled with scanpy (works offline).

    ``pbmc68k_reduced``: 700 PBMC cells × 765 genes, labels in
    ``obs["bulk_labels"]``. Its ``X`` is z-scored, so we return the
    log-normalised values from ``raw`` and mark the data as already log-scale.
    """
    import scanpy as sc

    if name not in SAMPLE_DATASETS:
        raise OmicsInputError(
            f"unknown sample data set {name!r}; choose one of {sorted(SAMPLE_DATASETS)}."
        )
    full = sc.datasets.pbmc68k_reduced()
    raw = full.raw.to_adata()
    raw = raw[:, full.var_names].copy()  # the 765 genes the reduced set keeps
    raw.obs = full.obs.copy()
    raw.X = np.asarray(raw.X.todense() if sp.issparse(raw.X) else raw.X, dtype=np.float32)
    raw.uns["omicsimage"] = {
        "source": f"scanpy.datasets.{name}",
        "orientation": "bundled AnnData, samples in rows",
        "log_scale": True,
        "label_column": SAMPLE_DATASETS[name],
    }
    raw.obs[SAMPLE_DATASETS[name]] = raw.obs[SAMPLE_DATASETS[name]].astype(str).astype("category")
    return raw


def reading_notes(adata: ad.AnnData) -> list[str]:
    """What :func:`read_expression` decided about the file (format, separator, encoding, orientation),
    one line each: the CLI prints them, the widgets and :func:`pipeline.imagify` show them."""
    info = adata.uns.get("omicsimage", {})
    notes = [str(n) for n in info.get("reading", [])]
    if info.get("orientation"):
        notes.append(str(info["orientation"]))
    return notes


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            return "10x-mtx"
        raise OmicsInputError(
            f"{path} is a folder without a 10x matrix.mtx(.gz); give an .h5ad, .csv, .tsv, "
            "10x .h5 or matrix.mtx path."
        )
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".h5"):
        return "10x-h5"
    if name.endswith((".mtx", ".mtx.gz")):
        return "10x-mtx"
    if name.endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")):
        return "table"
    raise OmicsInputError(
        f"{path.name}: unsupported file type. Use .h5ad, .csv/.tsv/.txt (optionally .gz), "
        "a 10x .h5, or a 10x matrix.mtx folder."
    )


_GZIP_MAGIC = b"\x1f\x8b"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: how many bytes of a table are looked at to decide its separator and encoding
_SNIFF_BYTES = 1 << 16
_SNIFF_MAX_BYTES = 1 << 23
_SEPARATOR_NAMES = {",": "comma", "\t": "tab", ";": "semicolon"}


@dataclass
class TextFormat:
    """How a text table is stored: decided from its content, not only its name."""

    sep: str
    compression: str | None  # "gzip" or None
    encoding: str  # "utf-8" or "latin-1"
    notes: list[str] = field(default_factory=list)

    def read_csv(self, path: Path, **options) -> pd.DataFrame:
        return pd.read_csv(path, sep=self.sep, compression=self.compression, encoding=self.encoding,
                           **options)


def _separator_from_name(name: str) -> str:
    name = name.lower().removesuffix(".gz")
    return "," if name.endswith(".csv") else "\t"


def _damaged_gzip(path: Path, exc: BaseException) -> OmicsInputError:
    return OmicsInputError(
        f"{path.name} is a damaged or truncated gzip file ({exc}); download or compress it again "
        "(gzip -t checks a file)."
    )


def _sniff_text(path: Path, what: str = "") -> TextFormat:
    """Compression (magic bytes), encoding and separator of a text table, with a note for each surprise."""
    what = what or path.name
    with path.open("rb") as handle:
        magic = handle.read(2)
    named_gz = path.name.lower().endswith(".gz")
    is_gzip = magic == _GZIP_MAGIC
    notes = []
    if named_gz and not is_gzip:
        with path.open("rb") as handle:
            content = "it is plain text" if _looks_like_text(handle.read(64)) else "its first bytes are not gzip's"
        raise OmicsInputError(
            f"{what} is named .gz but is not gzip-compressed ({content}); rename it to {path.name[:-3]} "
            "or compress it with gzip."
        )
    if is_gzip and not named_gz:
        notes.append(f"{path.name} is gzip-compressed although its name does not end in .gz: read it as gzip")
    try:
        with (gzip.open(path, "rb") if is_gzip else path.open("rb")) as handle:
            sample, complete = b"", False  # complete: the whole file was read
            # wide tables (genes in columns) can have lines longer than one block: read on to a few lines
            while not complete and sample.count(b"\n") < 3 and len(sample) < _SNIFF_MAX_BYTES:
                block = handle.read(_SNIFF_BYTES)
                sample += block
                complete = len(block) < _SNIFF_BYTES
    except (EOFError, OSError, zlib.error) as exc:
        raise _damaged_gzip(path, exc) from exc
    encoding = "utf-8"
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(sample) - 3 and not complete:
            text = sample[: exc.start].decode("utf-8")  # a character cut by the sample's end
        else:
            encoding = "latin-1"
            text = sample.decode("latin-1")
            notes.append(_latin1_note(path, sample[exc.start], exc.start))
    lines = text.splitlines()
    if not complete and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    sep = _sniff_separator(lines[:50], _separator_from_name(path.name))
    expected = _separator_from_name(path.name)
    suffix = path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
    if sep != expected and suffix in ("csv", "tsv"):
        notes.append(f"{path.name} is {_SEPARATOR_NAMES[sep]}-separated although named .{suffix}: "
                     f"read it as {_SEPARATOR_NAMES[sep]}-separated")
    elif suffix not in ("csv", "tsv"):
        notes.append(f"{path.name}: read as {_SEPARATOR_NAMES[sep]}-separated")
    return TextFormat(sep, "gzip" if is_gzip else None, encoding, notes)


def _latin1_note(path: Path, byte: int, offset: int) -> str:
    return (f"{path.name} is not UTF-8 (byte 0x{byte:02x} at offset {offset}): read it as Latin-1; "
            "check names with accents, or save the file as UTF-8")


def _sniff_separator(lines: list[str], expected: str) -> str:
    """The separator that splits every data line into the same number (> 1) of fields.

    The header may have one field fewer (R's ``write.table`` leaves out the corner cell). The
    separator the file name implies wins whenever it fits; quoted fields are honoured (csv module).
    """
    lines = [line for line in lines if line.strip()]
    if len(lines) < 2:
        return expected
    fitting = []
    for sep in (expected, *(c for c in _SEPARATOR_NAMES if c != expected)):
        try:
            widths = [len(row) for row in csv.reader(lines, delimiter=sep)]
        except csv.Error:  # e.g. a whole wide line as one over-long field: not this separator
            continue
        data = set(widths[1:])
        if len(data) == 1 and (width := data.pop()) > 1 and widths[0] in (width, width - 1):
            fitting.append((sep, width))
    if not fitting or fitting[0][0] == expected:
        return expected
    return max(fitting, key=lambda item: item[1])[0]


def _read_text_table(path: Path, fmt: TextFormat, notes: list[str], **options) -> pd.DataFrame:
    """``pd.read_csv`` with the sniffed format; a later non-UTF-8 byte switches to Latin-1 (noted)."""
    try:
        return fmt.read_csv(path, **options)
    except UnicodeDecodeError as exc:
        if fmt.encoding != "utf-8":
            raise
        fmt.encoding = "latin-1"
        notes.append(f"{path.name} is not UTF-8 ({exc.reason} at byte {exc.start} of a block): read it as "
                     "Latin-1; check names with accents, or save the file as UTF-8")
        return fmt.read_csv(path, **options)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged_gzip(path, exc) from exc


def _read_table(path: Path, notes: list[str] | None = None) -> pd.DataFrame:
    notes = [] if notes is None else notes
    if path.stat().st_size == 0:
        raise OmicsInputError(f"{path.name} is empty; it needs a header row and at least one data row.")
    fmt = _sniff_text(path)
    notes.extend(fmt.notes)
    try:
        # Ids are read as text: sample ids such as "01005" must keep their zeros.
        frame = _read_text_table(path, fmt, notes, index_col=0, dtype={0: str})
    except pd.errors.EmptyDataError as exc:
        raise OmicsInputError(f"{path.name} is empty; it needs a header row and data rows.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise OmicsInputError(f"{path.name} could not be parsed as a table: {exc}") from exc
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise OmicsInputError(
            f"{path.name} holds no expression values ({frame.shape[0]} rows × "
            f"{frame.shape[1]} columns); it needs ids in the first column and a header row "
            f"(read as {_SEPARATOR_NAMES[fmt.sep]}-separated)."
        )
    # before str() turns an empty id into a gene or sample called "nan"
    _refuse_unnamed(frame.index, "row", f"{path.name} (first column)")
    frame.index = frame.index.astype(str)
    # pandas renames repeated header names ("TP53", "TP53.1"); read the raw header to catch them
    header = fmt.read_csv(path, header=None, nrows=1, dtype=str).iloc[0, 1:]
    _refuse_unnamed(pd.Index(header), "column", f"{path.name} (header row)")
    if header.duplicated().any():
        repeated = list(header[header.duplicated()].unique()[:5])
        raise OmicsInputError(
            f"{path.name}: duplicate names in the header row, e.g. {repeated}; gene and sample names "
            "must be unique: aggregate or rename the repeated genes/samples first."
        )
    frame.columns = frame.columns.astype(str)
    return _to_numeric(frame, path.name)


def _read_hdf5(path: Path, kind: str) -> ad.AnnData:
    """An .h5ad or 10x .h5 file; anything that is not (intact) HDF5 gets a one-line error."""
    with path.open("rb") as handle:
        magic = handle.read(8)
    if magic != _HDF5_MAGIC:
        start = "gzip-compressed" if magic[:2] == _GZIP_MAGIC else (
            "text" if _looks_like_text(magic) else "not HDF5")
        writer = "AnnData.write_h5ad" if kind == "h5ad" else "Cell Ranger"
        raise OmicsInputError(
            f"{path.name} is not an HDF5 file (its content is {start}); an .h5{'ad' if kind == 'h5ad' else ''} "
            f"file must be written by {writer}: check the file, or rename it to what it holds (.csv, .gz…)."
        )
    try:
        if kind == "h5ad":
            return ad.read_h5ad(path)
        import scanpy as sc

        return sc.read_10x_h5(path)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OmicsInputError(
            f"{path.name} could not be read ({first}); the file is truncated or damaged: copy or "
            "write it again."
        ) from exc


def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _first_existing(folder: Path, *names: str) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_10x_folder(folder: Path) -> ad.AnnData:
    """A Cell Ranger matrix folder (v2 ``genes.tsv`` or v3 ``features.tsv``), compressed or not.

    scanpy's ``read_10x_mtx`` expects all-gzipped v3 or all-plain v2 files; folders that were
    unpacked (``gunzip *``) or mix the two are common, so each file is found in either form here.
    """
    import scipy.io

    matrix = _first_existing(folder, "matrix.mtx")
    genes = _first_existing(folder, "features.tsv", "genes.tsv")
    barcodes = _first_existing(folder, "barcodes.tsv")
    missing = [name for name, found in (("matrix.mtx", matrix), ("features.tsv or genes.tsv", genes),
                                        ("barcodes.tsv", barcodes)) if found is None]
    if missing:
        raise OmicsInputError(
            f"10x folder {folder.name} lacks {', '.join(missing)} (plain or .gz); a Cell Ranger matrix "
            "folder holds matrix.mtx, features.tsv (or genes.tsv) and barcodes.tsv."
        )
    try:
        counts = sp.csr_matrix(scipy.io.mmread(matrix).T, dtype=np.float32)  # 10x: genes × cells
        gene_table = pd.read_csv(genes, sep="\t", header=None, dtype=str)
        cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str)[0]
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OmicsInputError(f"10x folder {folder.name}: a damaged or truncated gzip file ({exc}); "
                              "copy the folder again.") from exc
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise OmicsInputError(f"10x folder {folder.name} could not be read ({exc}); check that its "
                              "matrix.mtx, features/genes and barcodes files belong together.") from exc
    if counts.shape != (len(cells), len(gene_table)):
        raise OmicsInputError(
            f"10x folder {folder.name}: matrix.mtx is {counts.shape[1]} genes × {counts.shape[0]} cells but "
            f"there are {len(gene_table)} features and {len(cells)} barcodes; the files do not belong together."
        )
    symbols = gene_table[1] if gene_table.shape[1] > 1 else gene_table[0]
    var = pd.DataFrame({"gene_ids": gene_table[0].to_numpy()},
                       index=ad.utils.make_index_unique(pd.Index(symbols.astype(str).to_numpy())))
    if gene_table.shape[1] > 2:
        var["feature_types"] = gene_table[2].to_numpy()
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(cells.astype(str).to_numpy())), var=var)
    if "feature_types" in adata.var and (adata.var["feature_types"] == "Gene Expression").any():
        adata = adata[:, (adata.var["feature_types"] == "Gene Expression").to_numpy()].copy()
    return adata


def _to_numeric(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        column = non_numeric[0]
        converted = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column][converted.isna() & frame[column].notna()]
        example = f" (row {bad.index[0]!r} holds {bad.iloc[0]!r})" if len(bad) else ""
        raise OmicsInputError(
            f"{what}: column {column!r} is not numeric{example}; "
            f"{len(non_numeric)} column(s) hold text. Expression tables must hold numbers only, "
            "with ids in the first column: remove annotation columns or fix the cells."
        )
    return frame


def _looks_like_gene_ids(names: pd.Index) -> float:
    """Fraction of names shaped like gene or probe ids (Ensembl, Affymetrix, symbols)."""
    sample = names[: min(len(names), 500)]
    if len(sample) == 0:
        return 0.0
    hits = sum(bool(_GENE_ID_PATTERN.match(n)) for n in sample)
    return hits / len(sample)


def _decide_orientation(
    frame: pd.DataFrame, orientation: Orientation, labels: pd.DataFrame | None
) -> OrientationDecision:
    if orientation == "genes-in-rows":
        return OrientationDecision(True, "set by the user")
    if orientation == "samples-in-rows":
        return OrientationDecision(False, "set by the user")
    if orientation != "auto":
        raise OmicsInputError(
            f"orientation must be 'auto', 'genes-in-rows' or 'samples-in-rows', not {orientation!r}."
        )
    if labels is not None:
        ids = set(labels.index)
        in_rows = len(ids.intersection(frame.index))
        in_cols = len(ids.intersection(frame.columns))
        if in_rows != in_cols:
            genes_in_rows = in_cols > in_rows
            return OrientationDecision(
                genes_in_rows,
                f"{max(in_rows, in_cols)} label sample ids match the "
                f"{'column' if genes_in_rows else 'row'} names",
            )
    row_genes, col_genes = _looks_like_gene_ids(frame.index), _looks_like_gene_ids(frame.columns)
    if abs(row_genes - col_genes) >= 0.5:
        genes_in_rows = row_genes > col_genes
        return OrientationDecision(
            genes_in_rows, f"the {'row' if genes_in_rows else 'column'} names look like gene or probe ids"
        )
    genes_in_rows = frame.shape[0] >= frame.shape[1]
    return OrientationDecision(
        genes_in_rows,
        f"the longer axis ({max(frame.shape)} entries) is taken as genes; "
        "override with genes-in-rows / samples-in-rows if that is wrong",
    )


def _frame_to_anndata(frame: pd.DataFrame, genes_in_rows: bool) -> ad.AnnData:
    if genes_in_rows:
        frame = frame.T
    adata = ad.AnnData(
        X=frame.to_numpy(dtype=np.float32, copy=True),
        obs=pd.DataFrame(index=pd.Index(frame.index.astype(str), name="sample")),
        var=pd.DataFrame(index=pd.Index(frame.columns.astype(str), name="gene")),
    )
    return adata


# ---------------------------------------------------------------------- checks
def _duplicates(names: pd.Index) -> list[str]:
    return list(pd.Index(names)[pd.Index(names).duplicated()].unique()[:5])


def _refuse_unnamed(names: pd.Index, axis: str, source: str = "the data") -> None:
    """An empty (or NA) gene or sample name would become a name like "nan" and be ranked as one."""
    empty = np.flatnonzero([pd.isna(n) or not str(n).strip() for n in names])
    if len(empty):
        raise OmicsInputError(
            f"{source}: {len(empty)} {axis}(s) have no name (an empty id cell), the first at {axis} "
            f"{empty[0] + 1} of {len(names)}; every gene and sample needs a name: fill it in or remove it.")


def validate_matrix(adata: ad.AnnData) -> None:
    """Raise :class:`OmicsInputError` for empty data, duplicate names or NaN/Inf values."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise OmicsInputError(
            f"the data hold {adata.n_obs} samples × {adata.n_vars} genes; need at least one of each."
        )
    _refuse_unnamed(adata.var_names, "gene")
    _refuse_unnamed(adata.obs_names, "sample")
    dup_genes = _duplicates(adata.var_names)
    if dup_genes:
        raise OmicsInputError(
            f"duplicate gene names, e.g. {dup_genes}; make them unique "
            "(AnnData.var_names_make_unique()) or aggregate the duplicated rows first."
        )
    dup_samples = _duplicates(adata.obs_names)
    if dup_samples:
        raise OmicsInputError(
            f"duplicate sample names, e.g. {dup_samples}; every sample needs its own id "
            "(AnnData.obs_names_make_unique())."
        )
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if not np.issubdtype(values.dtype, np.number):
        raise OmicsInputError("the expression matrix is not numeric; convert it to numbers first.")
    finite = np.isfinite(values)
    if not finite.all():
        n_bad = int((~finite).sum())
        example = ""
        if not sp.issparse(adata.X):
            r, c = np.argwhere(~np.isfinite(np.asarray(adata.X)))[0]
            example = f", first at sample {adata.obs_names[r]!r}, gene {adata.var_names[c]!r}"
        raise OmicsInputError(
            f"{n_bad} expression value(s) are NaN or infinite{example}; impute or drop them "
            "(e.g. fill with the gene's median) before imagifying."
        )


#: Labels written like this are missing values (R writes NA, pandas NaN), never a class of their own.
MISSING_LABELS = frozenset({"", "na", "nan", "n/a", "<na>", "null"})
_POSITION = re.compile(r"^#(\d+)$")


def _pick_column(columns: list[str], choice: str | None, option: str, what: str) -> int | None:
    """Index of the column named ``choice`` or given by position ``#N`` (1 = the first column)."""
    if choice is None:
        return None
    position = _POSITION.match(str(choice).strip())
    if position:
        index = int(position.group(1)) - 1
        if not 0 <= index < len(columns):
            raise OmicsInputError(f"{what} has {len(columns)} columns; {option} {choice} is out of range "
                                  f"(#1 … #{len(columns)}).")
        return index
    matches = [i for i, c in enumerate(columns) if c == choice]
    if not matches:
        raise OmicsInputError(f"{what} has no column {choice!r}; columns are {columns}.")
    if len(matches) > 1:
        raise OmicsInputError(_duplicate_column_message(what, choice, matches, option))
    return matches[0]


def _duplicate_column_message(what: str, name: str, positions: list[int], option: str) -> str:
    where = " and ".join(f"#{i + 1}" for i in positions)
    return (f"{what} has {len(positions)} columns named {name!r} (columns {where}); rename one, or pick "
            f"the one you mean by position with {option} #{positions[-1] + 1}.")


def read_labels_table(path: str | Path, notes: list[str] | None = None) -> pd.DataFrame:
    """A labels table as text, header names exactly as written (repeats kept), missing values as NaN."""
    path = Path(path)
    if not path.exists():
        raise OmicsInputError(f"labels file {path}: no such file. Check the path.")
    if path.stat().st_size == 0:
        raise OmicsInputError(f"labels file {path.name} is empty.")
    fmt = _sniff_text(path, f"labels file {path.name}")
    if notes is not None:
        notes.extend(fmt.notes)
    try:
        raw = _read_text_table(path, fmt, [] if notes is None else notes, dtype=str,
                               keep_default_na=False, header=None)
    except pd.errors.ParserError as exc:
        raise OmicsInputError(f"labels file {path.name} could not be parsed as a table: {exc}") from exc
    if raw.shape[0] < 2:
        raise OmicsInputError(f"labels file {path.name} holds a header but no samples.")
    frame = raw.iloc[1:].reset_index(drop=True)
    frame.columns = [str(c) for c in raw.iloc[0]]
    # ids stay as written; in every other column R's NA, NaN and empty cells are missing labels
    for i in range(1, frame.shape[1]):
        column = frame.iloc[:, i]
        frame.iloc[:, i] = column.where(~column.str.strip().str.lower().isin(MISSING_LABELS), np.nan)
    return frame


def _read_labels(labels, sample_column: str | None, label_column: str | None = None,
                 notes: list[str] | None = None, sample_names=None) -> tuple[pd.DataFrame, str | None]:
    """The labels table indexed by sample id, and the label column's name (``#N`` resolved).

    ``sample_names`` (the expression's sample names, or both axes of a table whose orientation is not yet
    decided) picks the id column when several share its name, as in a Bioconductor ``pData`` export
    (``sample,sample,outcome``: row names, then pData's own ``sample`` column).
    """
    if isinstance(labels, pd.Series):
        frame = labels.to_frame()
    elif isinstance(labels, pd.DataFrame):
        frame = labels.copy()
    else:
        path = Path(labels)
        frame = read_labels_table(path, notes)
        what = f"labels file {path.name}"
        columns = list(frame.columns)
        sample_at = _pick_id_column(frame, sample_column, what, sample_names, notes)
        label_at = _pick_column(columns, label_column, "--label-column", what)
        keep = [i for i in range(len(columns)) if i != sample_at]
        if label_at is not None and _POSITION.match(str(label_column).strip()):
            keep = [label_at]  # chosen by position: only that column is joined, so names cannot clash
        # the id column's name never reaches obs, so only the joined columns count
        repeated = pd.Index([columns[i] for i in keep]).duplicated(keep=False)
        clash = [columns[i] for i, twice in zip(keep, repeated) if twice]
        if clash:
            positions = [i for i in keep if columns[i] == clash[0]]
            raise OmicsInputError(_duplicate_column_message(what, clash[0], positions, "--label-column"))
        ids = frame.iloc[:, sample_at]
        frame = frame.iloc[:, keep].set_axis(ids.to_numpy())
        frame.index.name = None  # the id column's name may also be a joined column's (pData's 'sample')
        if label_at is not None:
            label_column = columns[label_at]
    frame.index = frame.index.astype(str)
    dup = _duplicates(frame.index)
    if dup:
        raise OmicsInputError(f"the labels table lists some samples twice, e.g. {dup}; keep one row per sample.")
    return frame, label_column


def _pick_id_column(frame: pd.DataFrame, sample_column: str | None, what: str, sample_names,
                    notes: list[str] | None) -> int:
    """The sample-id column: ``--sample-column`` (name or ``#N``) or the first; of several columns sharing
    that name, the one whose values are the expression's sample names (said in a note)."""
    columns = list(frame.columns)
    if sample_column is not None and _POSITION.match(str(sample_column).strip()):
        return _pick_column(columns, sample_column, "--sample-column", what)
    name = columns[0] if sample_column is None else str(sample_column)
    candidates = [i for i, c in enumerate(columns) if c == name]
    if len(candidates) <= 1:
        return 0 if sample_column is None else _pick_column(columns, sample_column, "--sample-column", what)
    where = " and ".join(f"#{i + 1}" for i in candidates)
    known = set() if sample_names is None else {str(n) for n in sample_names}
    matching = [i for i in candidates if known and frame.iloc[:, i].dropna().astype(str).isin(known).all()]
    if len(matching) != 1:
        verdict = "each holds" if matching else "none holds"
        raise OmicsInputError(f"{what} has {len(candidates)} columns named {name!r} (columns {where}) and "
                              f"{verdict} the expression's sample names; say which "
                              f"holds the sample ids by position, e.g. --sample-column #{candidates[0] + 1}.")
    if notes is not None:
        notes.append(f"{what} has {len(candidates)} columns named {name!r} ({where}): sample ids read from "
                     f"#{matching[0] + 1}, whose values are the expression's sample names")
    return matching[0]


def attach_labels(adata: ad.AnnData, labels: pd.DataFrame, label_column: str | None) -> None:
    """Join a per-sample labels table onto ``adata.obs`` (in place) and check it."""
    if label_column is None:
        if labels.shape[1] != 1:
            raise OmicsInputError(
                f"the labels table has several columns {list(labels.columns)}; "
                "say which holds the classes with label_column / --label-column."
            )
        label_column = labels.columns[0]
    if label_column not in labels.columns:
        raise OmicsInputError(
            f"the labels table has no column {label_column!r}; columns are {list(labels.columns)}."
        )
    unknown = labels.index.difference(adata.obs_names)
    if len(unknown):
        raise OmicsInputError(
            f"{len(unknown)} labelled sample(s) are not in the expression data, e.g. "
            f"{list(unknown[:5])}; check that both files use the same sample ids (and orientation)."
        )
    for column in labels.columns:
        adata.obs[column] = labels[column].reindex(adata.obs_names).to_numpy()
    check_labels(adata, label_column)


def check_labels(adata: ad.AnnData, label_column: str) -> None:
    """Every sample has a label and there are at least two classes."""
    if label_column not in adata.obs.columns:
        raise OmicsInputError(
            f"no label column {label_column!r} in the data; available columns: "
            f"{list(adata.obs.columns)}. Pick one or give a labels table."
        )
    if adata.n_obs < 2:
        raise OmicsInputError(
            f"the data hold {adata.n_obs} sample; classification needs at least two samples "
            "(of at least two classes)."
        )
    values = adata.obs[label_column]
    missing = values.isna() | values.astype(str).str.strip().str.lower().isin(MISSING_LABELS)
    if missing.any():
        raise OmicsInputError(
            f"{int(missing.sum())} sample(s) have no label in {label_column!r}, e.g. "
            f"{list(adata.obs_names[missing.to_numpy()][:5])} (empty, NA or NaN); label them or drop "
            "them (adata = adata[adata.obs[col].notna()])."
        )
    adata.obs[label_column] = values.astype(str).astype("category")
    n_classes = adata.obs[label_column].nunique()
    if n_classes == adata.n_obs:
        raise OmicsInputError(
            f"label column {label_column!r} gives each of the {adata.n_obs} samples a label of its own (e.g. "
            f"{list(values.astype(str).iloc[:3])}), so every class would have one sample: it looks like a "
            "sample id, not classes. Choose the column that holds the classes (--label-column)."
        )
    if n_classes < 2:
        raise OmicsInputError(
            f"label column {label_column!r} holds a single class ({values.iloc[0]!r}); "
            "classification needs at least two classes."
        )
    adata.uns.setdefault("omicsimage", {})["label_column"] = label_column


def dense_matrix(adata: ad.AnnData) -> np.ndarray:
    """``adata.X`` as a dense float32 array (the renderer and models want dense)."""
    x = adata.X
    if sp.issparse(x):
        x = x.toarray()
    return np.asarray(x, dtype=np.float32)
