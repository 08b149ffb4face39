"""Reading expression data into AnnData, with labels, and checking it.

Everything downstream takes an :class:`anndata.AnnData` with samples in rows
(``obs``) and genes in columns (``var``), a dense or sparse numeric ``X`` and the
class labels in an ``obs`` column.  This module is the one place that turns the
many shapes users bring (h5ad, CSV/TSV in either orientation, 10x) into that.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
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
        table, in ``adata.obs``. The labels are checked (no missing ones, no
        unknown samples, at least two classes).
    """
    path = Path(path)
    if not path.exists():
        raise OmicsInputError(f"{path}: no such file or folder. Check the path and try again.")
    kind = _file_kind(path)
    labels_frame = _read_labels(labels, sample_column) if labels is not None else None
    if kind == "h5ad":
        adata = ad.read_h5ad(path)
        note = "h5ad files store samples in rows"
    elif kind == "table":
        frame = _read_table(path)
        decision = _decide_orientation(frame, orientation, labels_frame)
        adata = _frame_to_anndata(frame, decision.genes_in_rows)
        note = decision.describe()
        log.info("%s: %s", path.name, note)
    else:  # 10x
        import scanpy as sc

        if kind == "10x-h5":
            adata = sc.read_10x_h5(path)
        else:
            folder = path if path.is_dir() else path.parent
            adata = sc.read_10x_mtx(folder)
        note = "10x files store cells in rows"
    adata.uns["omicsimage"] = {"source": str(path), "orientation": note}
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    validate_matrix(adata)
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


def _separator(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    return "," if name.endswith(".csv") else "\t"


def _read_table(path: Path) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise OmicsInputError(f"{path.name} is empty; it needs a header row and at least one data row.")
    try:
        # Ids are read as text: sample ids such as "01005" must keep their zeros.
        frame = pd.read_csv(path, sep=_separator(path), index_col=0, dtype={0: str})
    except pd.errors.EmptyDataError as exc:
        raise OmicsInputError(f"{path.name} is empty; it needs a header row and data rows.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise OmicsInputError(f"{path.name} could not be parsed as a table: {exc}") from exc
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise OmicsInputError(
            f"{path.name} holds no expression values ({frame.shape[0]} rows × "
            f"{frame.shape[1]} columns); it needs ids in the first column and a header row."
        )
    frame.index = frame.index.astype(str)
    # pandas renames repeated header names ("TP53", "TP53.1"); read the raw header to catch them
    header = pd.read_csv(path, sep=_separator(path), header=None, nrows=1, dtype=str).iloc[0, 1:]
    if header.duplicated().any():
        repeated = list(header[header.duplicated()].unique()[:5])
        raise OmicsInputError(
            f"{path.name}: duplicate names in the header row, e.g. {repeated}; gene and sample names "
            "must be unique: aggregate or rename the repeated genes/samples first."
        )
    frame.columns = frame.columns.astype(str)
    return _to_numeric(frame, path.name)


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


def validate_matrix(adata: ad.AnnData) -> None:
    """Raise :class:`OmicsInputError` for empty data, duplicate names or NaN/Inf values."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise OmicsInputError(
            f"the data hold {adata.n_obs} samples × {adata.n_vars} genes; need at least one of each."
        )
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


def _read_labels(labels, sample_column: str | None) -> pd.DataFrame:
    if isinstance(labels, pd.Series):
        frame = labels.to_frame()
    elif isinstance(labels, pd.DataFrame):
        frame = labels.copy()
    else:
        path = Path(labels)
        if not path.exists():
            raise OmicsInputError(f"labels file {path}: no such file. Check the path.")
        if path.stat().st_size == 0:
            raise OmicsInputError(f"labels file {path.name} is empty.")
        frame = pd.read_csv(path, sep=_separator(path), dtype=str, keep_default_na=False, na_values=[""])
        if sample_column is None:
            sample_column = frame.columns[0]
        if sample_column not in frame.columns:
            raise OmicsInputError(
                f"labels file {path.name} has no column {sample_column!r}; columns are {list(frame.columns)}."
            )
        frame = frame.set_index(sample_column)
    frame.index = frame.index.astype(str)
    dup = _duplicates(frame.index)
    if dup:
        raise OmicsInputError(f"the labels table lists some samples twice, e.g. {dup}; keep one row per sample.")
    return frame


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
    values = adata.obs[label_column]
    missing = values.isna() | (values.astype(str).str.strip() == "")
    if missing.any():
        raise OmicsInputError(
            f"{int(missing.sum())} sample(s) have no label in {label_column!r}, e.g. "
            f"{list(adata.obs_names[missing.to_numpy()][:5])}; label them or drop them "
            "(adata = adata[adata.obs[col].notna()])."
        )
    adata.obs[label_column] = values.astype(str).astype("category")
    n_classes = adata.obs[label_column].nunique()
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
