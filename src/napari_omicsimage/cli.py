"""Command line: ``omicsimage render|evaluate|train|predict|explain|demo``.

Every command exits non-zero with a one-line error for bad input, and never
overwrites an existing output without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from pathlib import Path

# Only light imports here: numpy/pandas/scanpy load inside main(), so Ctrl-C while they load is a
# one-line "interrupted", not a traceback.
from .errors import OmicsInputError

log = logging.getLogger("napari_omicsimage")

LABEL_COLUMN_HELP = ("column holding the class labels (in --labels, or in the h5ad obs); in --labels also by "
                     "position: #N is the N-th column of the file (#1 the first), for tables with repeated names")
SAMPLE_COLUMN_HELP = "sample-id column of --labels, by name or position #N (default: the first column)"
OVERWRITE_HELP = ("replace what an earlier omicsimage run wrote at --out (only the files it wrote; nothing "
                  "else there is touched)")


# ------------------------------------------------------------ shared options
def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """INPUT plus the options that say how to read and label it."""
    from .io import SAMPLE_DATASETS

    parser.add_argument("input", metavar="INPUT",
                        help="expression file (.h5ad, .csv/.tsv[.gz], 10x .h5 or matrix.mtx folder), "
                             f"or the name of bundled sample data: {', '.join(SAMPLE_DATASETS)}")
    parser.add_argument("--labels", metavar="FILE", help="table of sample id → label(s), joined on sample id")
    parser.add_argument("--label-column", metavar="COL", help=LABEL_COLUMN_HELP)
    parser.add_argument("--sample-column", metavar="COL", help=SAMPLE_COLUMN_HELP)
    orient = parser.add_mutually_exclusive_group()
    orient.add_argument("--genes-in-rows", action="store_const", dest="orientation",
                        const="genes-in-rows", help="tables: genes are rows, samples are columns")
    orient.add_argument("--samples-in-rows", action="store_const", dest="orientation",
                        const="samples-in-rows", help="tables: samples are rows, genes are columns")
    parser.set_defaults(orientation="auto")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--log-scale", action="store_const", const=True, dest="log_scale",
                       help="values are already log-scale (microarrays): do not normalise again")
    scale.add_argument("--counts", action="store_const", const=False, dest="log_scale",
                       help="values are counts: normalise_total + log1p")
    parser.set_defaults(log_scale=None)
    parser.add_argument("--n-top-genes", type=int, default=2000,
                        help="keep this many highly variable genes, fitted on training samples "
                             "(0 keeps all; default 2000)")


def add_layout_arguments(parser: argparse.ArgumentParser, *, default_method: str = "deepinsight") -> None:
    from .layouts import DISCRETIZATIONS, FEATURE_EXTRACTORS, GRID_ORDERS, METHODS

    parser.add_argument("--method", choices=METHODS, default=default_method, help="how samples become images")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels, at least 2 (default: 32; grid, som and the lsa/ags "
                             "discretisations: the smallest square with a pixel per gene; rgb-embedding: 128); "
                             "sizes whose images would not fit in memory are refused")
    parser.add_argument("--extractor", choices=FEATURE_EXTRACTORS, default=None,
                        help="deepinsight: gene embedding (default tsne)")
    parser.add_argument("--discretization", choices=DISCRETIZATIONS, default=None,
                        help="deepinsight/fotomics/rgb-layouts: coordinates → pixels (default bin; lsa and ags "
                             "give every gene its own pixel)")
    parser.add_argument("--order", choices=GRID_ORDERS, default=None, help="grid: gene order (default cluster)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def layout_spec(args) -> dict:
    """``{"method", "size", **params}`` from parsed arguments (what layouts.make_layout takes)."""
    params = {}
    if args.method in ("deepinsight", "rgb-layouts", "rgb-embedding", "som"):
        params["random_state"] = args.seed
    if args.extractor is not None:
        if args.method != "deepinsight":
            raise OmicsInputError("--extractor applies to --method deepinsight only.")
        params["feature_extractor"] = args.extractor
    if args.discretization is not None:
        if args.method not in ("deepinsight", "fotomics", "rgb-layouts"):
            raise OmicsInputError("--discretization applies to deepinsight, fotomics and rgb-layouts.")
        params["discretization"] = args.discretization
    if args.order is not None:
        if args.method != "grid":
            raise OmicsInputError("--order applies to --method grid only.")
        params["order"] = args.order
    return {"method": args.method, "size": args.size, **params}


def preprocess_config(args):
    from .preprocess import PreprocessConfig

    n_top = None if args.n_top_genes in (None, 0) else args.n_top_genes
    if n_top is not None and n_top < 0:
        raise OmicsInputError("--n-top-genes must be 0 (all genes) or positive.")
    return PreprocessConfig(log_scale=args.log_scale, n_top_genes=n_top)


def load_input(args, *, require_labels: bool = True):
    """Read INPUT (or bundled sample data) and return ``(adata, label_column)``.

    Prints to stderr what was decided while reading (format, separator, encoding, orientation) and, for
    commands that preprocess, how the values will be read (counts or log-scale).
    """
    from .io import SAMPLE_DATASETS, check_labels, load_sample_data, read_expression, reading_notes

    path = Path(args.input)
    if not path.exists() and args.input in SAMPLE_DATASETS:
        adata = load_sample_data(args.input)
        label_column = args.label_column or SAMPLE_DATASETS[args.input]
        if args.labels:
            raise OmicsInputError("bundled sample data carry their own labels; drop --labels.")
    elif _streams(args, path):
        from .streaming import open_cells

        started = time.perf_counter()
        adata = open_cells(path, labels=args.labels or None, sample_column=args.sample_column,
                           label_column=args.label_column if args.labels else None)
        log.info("stage read: %.2f s", time.perf_counter() - started)
        label_column = args.label_column
        if args.labels:
            label_column = adata.uns["omicsimage"].get("label_column")
        print(f"{path.name}: {adata.n_obs} cells, read backed (streaming path: bounded memory)", file=sys.stderr)
    else:
        adata = read_expression(path, orientation=args.orientation, labels=args.labels,
                                label_column=args.label_column, sample_column=args.sample_column)
        label_column = args.label_column
        if args.labels:  # the labels table's column, with a position (#N) resolved to its name
            label_column = adata.uns["omicsimage"].get("label_column")
    if label_column is None and require_labels:
        raise OmicsInputError("no labels: give --label-column (and --labels FILE if they are in another table).")
    if label_column is not None:
        check_labels(adata, label_column)
    name = Path(args.input).name
    notes = reading_notes(adata)
    for note in notes[:-1]:
        print(note, file=sys.stderr)
    if notes:
        print(f"{name}: {notes[-1]}; {adata.n_obs} samples × {adata.n_vars} genes", file=sys.stderr)
    if hasattr(args, "log_scale") and adata.isbacked:  # judged on the first cells, not the whole file
        from .preprocess import PreprocessConfig
        from .streaming.fit import decide_scale_streaming

        decision = decide_scale_streaming(adata, None, PreprocessConfig(log_scale=args.log_scale))
        print(f"{name}: {decision.describe()}", file=sys.stderr)
    elif hasattr(args, "log_scale"):  # commands that preprocess (predict uses its checkpoint's choice)
        from .preprocess import decide_scale

        print(f"{name}: {decide_scale(adata, args.log_scale).describe()}", file=sys.stderr)
    return adata, label_column


def _streams(args, path: Path) -> bool:
    """Whether INPUT goes through :mod:`napari_omicsimage.streaming` (``--backed``, default auto)."""
    backed = getattr(args, "backed", None)
    if backed is None:
        return False
    from .streaming import wants_streaming

    return wants_streaming(path, backed)


def add_backed_argument(parser: argparse.ArgumentParser) -> None:
    from .streaming import STREAM_ABOVE_BYTES, STREAM_ABOVE_CELLS

    parser.add_argument("--backed", choices=["auto", "yes", "no"], default="auto",
                        help=".h5ad: read it backed and stream cells in blocks, in bounded memory (auto: for "
                             f"more than {STREAM_ABOVE_CELLS:,} cells or files over "
                             f"{STREAM_ABOVE_BYTES >> 30} GB; the outputs are the same)")


def command_inputs(args) -> list:
    """The files a command reads (data, labels, model): ``--out`` may never be or contain one."""
    return [getattr(args, name) for name in ("input", "labels", "model_file") if getattr(args, name, None)]


def check_out(args, kind: str) -> Path:
    """Check ``--out`` before any work (see :func:`napari_omicsimage.outputs.check_output`)."""
    from .outputs import check_output

    return check_output(args.out, kind=kind, inputs=command_inputs(args), overwrite=args.overwrite)


# ------------------------------------------------------------------ render
def cmd_render(args) -> int:
    from .pipeline import imagify, write_render_outputs

    out = check_out(args, "dir")
    adata, label_column = load_input(args, require_labels=False)
    spec = layout_spec(args)
    if adata.isbacked:  # images written block by block (streaming/render.py)
        from .streaming.render import render_streaming

        if args.layout_cells < 2:
            raise OmicsInputError("--layout-cells must be at least 2.")
        shape, notes = render_streaming(adata, spec, out, label_column=label_column,
                                        preprocess=preprocess_config(args), layout_cells=args.layout_cells,
                                        seed=args.seed, overwrite=args.overwrite, inputs=command_inputs(args))
        from .io import reading_notes

        for note in notes[len(reading_notes(adata)) + 1:]:  # reading and scale notes: printed by load_input
            print(note)
        print(f"wrote {shape[0]} images of shape {shape[1:]} to {out}")
        return 0
    method, size = spec.pop("method"), spec.pop("size")
    result = imagify(adata, method, size=size, label_column=label_column,
                     preprocess=preprocess_config(args), layout_params=spec)
    write_render_outputs(result, out, overwrite=args.overwrite, inputs=command_inputs(args))
    from .io import reading_notes
    from .preprocess import decide_scale

    printed = {*reading_notes(adata), decide_scale(adata, args.log_scale).describe()}  # by load_input
    for note in result.notes:
        if note not in printed:
            print(note)
    print(f"wrote {result.images.shape[0]} images of shape {result.images.shape[1:]} to {out}")
    return 0


# ------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omicsimage", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="turn expression data into images (N, C, H, W)")
    add_input_arguments(render)
    add_layout_arguments(render)
    from ._cli_models import add_layout_cells_argument

    add_backed_argument(render)
    add_layout_cells_argument(render)
    render.add_argument("--out", required=True, metavar="DIR", help="output folder")
    render.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    render.set_defaults(func=cmd_render)

    _register_extra_commands(sub)
    return parser


def _register_extra_commands(sub) -> None:
    """Commands that live beside their features (models, napari demo)."""
    from . import _cli_models

    _cli_models.register(sub)
    from . import _cli_demo

    _cli_demo.register(sub)
    from .histology import _cli as _cli_histology

    _cli_histology.register(sub)


def _command_name(argv) -> str:
    """The subcommand, for messages before (or without) parsing."""
    words = sys.argv[1:] if argv is None else list(argv)
    return next((w for w in words if not str(w).startswith("-")), "")


def _os_error_message(exc: OSError) -> str:
    """One line for a file-system error: the file, what happened, what to do."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
        where = f"{exc.filename} → {exc.filename2}: "
    if isinstance(exc, PermissionError):
        fix = "check the permissions, or choose a place you can write to"
    elif isinstance(exc, FileNotFoundError):
        fix = "check the path"
    elif exc.errno == errno.ENOSPC:
        fix = "free some disk space or choose another place"
    else:
        fix = "check the file and the path"
    return f"{where}{what}; {fix}."


def _prog(command: str) -> str:
    return f"omicsimage {command}" if command else "omicsimage"


def _error(command: str, message: str) -> None:
    one_line = " ".join(str(message).split())
    print(f"{_prog(command)}: error: {one_line}", file=sys.stderr)


def main(argv=None) -> int:
    command = _command_name(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return int(args.func(args) or 0)
    except OmicsInputError as exc:
        _error(command, str(exc))
        return 2
    except OSError as exc:  # unreadable input, unwritable output, full disk: the file and the fix, no traceback
        _error(command, _os_error_message(exc))
        return 2
    except MemoryError:
        _error(command, "ran out of memory; keep fewer genes (--n-top-genes), use a smaller --size, or fewer "
                        "samples.")
        return 2
    except KeyboardInterrupt:
        print(f"{_prog(command)}: interrupted", file=sys.stderr)
        return 130
    finally:  # a command that stopped before writing gives back the --out it claimed
        outputs = sys.modules.get("napari_omicsimage.outputs")
        if outputs is not None:
            outputs.release_claims()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
