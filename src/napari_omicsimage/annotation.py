"""The bundled human gene annotation: chromosome positions and symbols of genes.

Ensembl 110 / GRCh38 gene cache of Ideogram.js (CC0), shipped inside the package
so that it works offline.  Genes are matched by Ensembl id (also Affymetrix
``ENSG…_at`` probe ids and versioned ids ``ENSG….12``) or by symbol.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import pandas as pd

_CHROMOSOME_RANK = {str(i): i for i in range(1, 23)} | {"X": 23, "Y": 24, "MT": 25, "M": 25}


@lru_cache(maxsize=1)
def gene_annotation() -> pd.DataFrame:
    """The bundled CC0 human gene annotation (Ensembl 110 / GRCh38).

    Columns: ``ensembl_id``, ``symbol``, ``chromosome``, ``start``, ``chrom_rank``.
    """
    ref = resources.files("napari_omicsimage") / "data" / "homo_sapiens_genes_grch38.tsv.gz"
    with ref.open("rb") as handle, gzip.open(handle, "rt") as text:
        lines = [ln for ln in text if not ln.startswith("##")]
    header = lines[0].lstrip("# ").rstrip("\n").split("\t")
    rows = [ln.rstrip("\n").split("\t") for ln in lines[1:]]
    frame = pd.DataFrame(rows, columns=header)
    frame["ensembl_id"] = "ENSG" + frame["slim_id"].str.zfill(11)
    frame["chromosome"] = frame["chr"].astype(str)
    frame["start"] = pd.to_numeric(frame["start"], errors="coerce")
    frame["chrom_rank"] = frame["chromosome"].map(_CHROMOSOME_RANK).fillna(99).astype(int)
    return frame[["ensembl_id", "symbol", "chromosome", "start", "chrom_rank"]]


def _normalise_gene_id(name: str) -> str:
    name = str(name).strip()
    upper = name.upper()
    if upper.startswith("ENSG"):
        upper = upper.split("_")[0].split(".")[0]  # ENSG…_at probe ids, ENSG….12 versions
    return upper


def chromosome_positions(genes) -> pd.DataFrame:
    """Chromosome and start of each gene, matched by Ensembl id or symbol.

    Returns one row per input gene with ``chromosome``, ``start`` and
    ``chrom_rank`` (NaN where the gene is not in the annotation).
    """
    ann = gene_annotation()
    by_id = ann.set_index("ensembl_id")[["chromosome", "start", "chrom_rank"]]
    by_symbol = (ann.assign(key=ann["symbol"].str.upper()).drop_duplicates("key")
                 .set_index("key")[["chromosome", "start", "chrom_rank"]])
    keys = [_normalise_gene_id(g) for g in genes]
    from_id = by_id.reindex(keys).reset_index(drop=True)
    from_symbol = by_symbol.reindex(keys).reset_index(drop=True)
    out = from_id.combine_first(from_symbol)[["chromosome", "start", "chrom_rank"]]
    out.index = pd.Index([str(g) for g in genes], name="gene")
    return out


def gene_symbols(genes) -> list[str]:
    """Display names: the symbol for Ensembl ids the annotation knows, the input name otherwise."""
    ann = gene_annotation()
    symbol_of = dict(zip(ann["ensembl_id"], ann["symbol"]))
    out = []
    for gene in genes:
        key = _normalise_gene_id(gene)
        out.append(symbol_of.get(key, str(gene)) if key.startswith("ENSG") else str(gene))
    return out
