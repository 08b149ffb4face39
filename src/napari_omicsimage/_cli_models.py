"""CLI commands for models: ``evaluate``, ``train``, ``predict``, ``explain``.

They follow ``omicsimage render``: the same input and layout options, a
one-line error (exit 2) for bad input, and no existing output replaced
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import OmicsInputError


# ------------------------------------------------------------------ options
def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import MODEL_NAMES

    parser.add_argument("--model", choices=MODEL_NAMES, default="small",
                        help="network (default small: a CNN that trains fast on a CPU)")
    parser.add_argument("--protocol", choices=["recommended", "paper"], default="recommended",
                        help="training settings: recommended (default: 20 epochs, batch 16, lr 1e-3) or paper "
                             "(the seed paper's 5 epochs, batch 32, lr 1e-4, which underfits small data sets); "
                             "--epochs, --batch-size and --lr override them")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the protocol's)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the protocol's)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the protocol's)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--weights", default=None, metavar="imagenet|FILE",
                        help="start from ImageNet weights (downloaded, or a local torchvision .pth file); "
                             "default: random initialisation")
    parser.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                        help="train in float32 on GPUs too")


def _add_predict_input_arguments(parser: argparse.ArgumentParser) -> None:
    """INPUT and how to read it; preprocessing comes from the checkpoint."""
    from .cli import SAMPLE_COLUMN_HELP

    parser.add_argument("input", metavar="INPUT", help="expression file, as for `omicsimage render`")
    parser.add_argument("--labels", metavar="FILE", help="optional table of true labels (to score predictions)")
    parser.add_argument("--label-column", metavar="COL",
                        help="column holding the true labels (in --labels also by position #N, #1 the first)")
    parser.add_argument("--sample-column", metavar="COL", help=SAMPLE_COLUMN_HELP)
    orient = parser.add_mutually_exclusive_group()
    orient.add_argument("--genes-in-rows", action="store_const", dest="orientation", const="genes-in-rows")
    orient.add_argument("--samples-in-rows", action="store_const", dest="orientation", const="samples-in-rows")
    parser.set_defaults(orientation="auto")
    parser.add_argument("--max-missing", type=float, default=None, metavar="FRACTION",
                        help="refuse when more than this share of the model's genes is missing (default 0.2)")


def _train_config(args):
    from .cli import preprocess_config
    from .training import TrainConfig

    chosen = {key: getattr(args, key) for key in ("epochs", "batch_size", "lr") if getattr(args, key) is not None}
    return TrainConfig.for_protocol(args.protocol, model=args.model, seed=args.seed, device=args.device,
                                    weights=args.weights, mixed_precision=args.mixed_precision,
                                    preprocess=preprocess_config(args), **chosen).validate()


def _max_missing(args) -> dict:
    if args.max_missing is None:
        return {}
    if not 0 <= args.max_missing <= 1:
        raise OmicsInputError("--max-missing is a fraction between 0 and 1.")
    return {"max_missing_fraction": args.max_missing}


class _ConsoleProgress:
    """One line per epoch (with -v) and per fold on stderr; ``batches``: also about every tenth of an epoch
    (streaming: an epoch over 10⁵+ cells is long)."""

    def __init__(self, verbose: bool, *, batches: bool = False):
        self.verbose, self.batches = verbose, batches

    def __call__(self, event):
        tenth = event.stage == "batch" and self.batches and event.n_batches and \
            (event.batch + 1) % max(event.n_batches // 10, 1) == 0 and event.batch + 1 < event.n_batches
        if event.stage == "fold" or (event.stage == "epoch" and self.verbose) or tenth:
            print(event.describe(), file=sys.stderr, flush=True)


# ------------------------------------------------------------------ commands
def cmd_evaluate(args) -> int:
    from functools import partial

    from .cli import check_out, command_inputs, layout_spec, load_input
    from .evaluation import cross_validate, write_report
    from .reports import metrics_table

    out = check_out(args, "dir")
    if args.compare_model is not None and args.compare_model == args.model:
        raise OmicsInputError("--compare-model must differ from --model.")
    config = _train_config(args)
    adata, label_column = load_input(args)
    spec = layout_spec(args)
    started = time.perf_counter()
    if adata.isbacked:  # every fold fitted on its training cells, streamed (streaming/cv.py)
        from .streaming import cross_validate_streaming

        if args.transductive:
            raise OmicsInputError("--transductive is not available on the streaming path (it fits on all cells, "
                                  "which is optimistic anyway); use --backed no on data that fit in memory.")
        progress = _ConsoleProgress(True, batches=True)
        run = partial(cross_validate_streaming, options=_streaming_options(args))
    else:
        progress = _ConsoleProgress(args.verbose)
        run = partial(cross_validate, transductive=args.transductive)
    result = run(adata, label_column, spec, config, folds=args.folds, progress=progress)
    if args.compare_model is not None:
        from dataclasses import replace

        print(f"cross-validating {args.compare_model} on the same folds for the Wilcoxon test", file=sys.stderr)
        other = run(adata, label_column, spec, replace(config, model=args.compare_model), folds=args.folds,
                    progress=progress, baseline=False)
        result.compare(other)
    elapsed = time.perf_counter() - started
    result.metrics["seconds"] = round(elapsed, 1)
    write_report(result, out, overwrite=args.overwrite, inputs=command_inputs(args))
    for note in result.notes:
        print(f"note: {note}")
    print(metrics_table(result))
    if args.compare_model is not None:
        other_mean = result.metrics["compare_model"]["mean"]
        print(f"{args.compare_model}: mean accuracy {other_mean['accuracy']:.3f}, "
              f"f1 {other_mean['f1_macro']:.3f}")
    print(f"{elapsed:.1f} s; wrote metrics.json, metrics.csv, predictions.csv and plots to {out}")
    return 0


def _streaming_options(args):
    from .streaming.run import StreamingOptions

    if args.layout_cells < 2:
        raise OmicsInputError("--layout-cells must be at least 2.")
    if args.max_steps is not None and args.max_steps < 1:
        raise OmicsInputError("--max-steps must be at least 1.")
    if args.cache_gb < 0:
        raise OmicsInputError("--cache-gb must be 0 (always read from the file) or more.")
    return StreamingOptions(layout_cells=args.layout_cells, max_steps=args.max_steps, cache_gb=args.cache_gb)


def cmd_train(args) -> int:
    from .checkpoint import save_checkpoint
    from .cli import check_out, command_inputs, layout_spec, load_input
    from .training import train

    out = check_out(args, "file")
    config = _train_config(args)
    if args.devices != 1 or _under_torchrun():
        from .streaming.ddp import train_distributed_cli

        return train_distributed_cli(args, config, layout_spec(args), _streaming_options(args))
    adata, label_column = load_input(args)
    spec = layout_spec(args)
    if spec["method"] == "rgb-embedding":
        print("note: rgb-embedding checkpoints rebuild t-SNE exactly but project new samples into UMAP by "
              "their nearest training samples, so the blue channel can differ slightly after reloading "
              "(see docs/models.md)", file=sys.stderr)
    progress = _ConsoleProgress(True)
    if adata.isbacked:
        from .streaming import train_streaming

        trained = train_streaming(adata, label_column, spec, config, _streaming_options(args), progress=progress)
    else:
        trained = train(adata, label_column, spec, config, progress=progress)
    save_checkpoint(trained, out, overwrite=args.overwrite, inputs=command_inputs(args))
    last = trained.history[-1] if trained.history else None
    print(f"trained {config.model} on {adata.n_obs} samples × {len(trained.genes)} genes, "
          f"{trained.layout.describe()}, classes {trained.classes}")
    if last is not None:
        print(f"final epoch {last['epoch']}: loss {last['loss']:.4f}, training accuracy {last['train_accuracy']:.3f}")
    print(f"wrote {out}")
    return 0


def _report_missing(trained, adata) -> None:
    missing = trained.missing_genes(adata)
    if missing:
        print(f"{len(missing)} of the model's {len(trained.genes)} genes are missing from the input and were "
              f"filled with their training mean, e.g. {missing[:5]}", file=sys.stderr)


def cmd_predict(args) -> int:
    from .checkpoint import load_checkpoint
    from .cli import check_out, command_inputs, load_input
    from .outputs import write_output_file

    out = check_out(args, "file")
    trained = load_checkpoint(args.model_file, device=args.device)
    adata, label_column = load_input(args, require_labels=False)
    if adata.isbacked:
        from .streaming import predict_streaming

        summary = predict_streaming(trained, adata, out, label_column=label_column, overwrite=args.overwrite,
                                    inputs=command_inputs(args), **_max_missing(args))
        _report_missing(trained, adata)
        if summary.accuracy is not None:
            print(f"accuracy on the {summary.n_cells} labelled samples: {summary.accuracy:.3f}")
        print(f"predicted {summary.n_cells} samples: {summary.counts}; wrote {out}")
        return 0
    frame = trained.predict(adata, **_max_missing(args))
    _report_missing(trained, adata)
    if label_column is not None:
        truth = adata.obs[label_column].astype(str).to_numpy()
        frame.insert(1, "true", truth)
        print(f"accuracy on the {len(frame)} labelled samples: {(frame['predicted'] == truth).mean():.3f}")
    write_output_file(out, lambda tmp: frame.to_csv(tmp, index=False), overwrite=args.overwrite,
                      inputs=command_inputs(args))
    counts = frame["predicted"].value_counts().to_dict()
    print(f"predicted {len(frame)} samples: {counts}; wrote {out}")
    return 0


def cmd_explain(args) -> int:
    from .checkpoint import load_checkpoint
    from .cli import check_out, command_inputs, load_input
    from .explain import explain, write_explanation
    from .layouts import NO_GENE_MAP
    from .outputs import write_output_dir
    from .streaming.explain import check_cells_per_class, explain_streaming, select_cells

    out = check_out(args, "dir")
    if args.top_genes < 1:
        raise OmicsInputError("--top-genes must be at least 1.")
    cells_per_class = check_cells_per_class(args.cells_per_class)
    trained = load_checkpoint(args.model_file, device=args.device)
    if not trained.layout.has_gene_map:
        raise OmicsInputError(NO_GENE_MAP)
    adata, label_column = load_input(args, require_labels=False)
    options = dict(pixel_method=args.pixel_method, baseline=args.baseline, n_steps=args.steps,
                   **_max_missing(args))
    progress = _ExplainProgress()
    done = {}

    def fill(tmp: Path) -> None:
        if adata.isbacked:  # block by block: memory does not grow with the cells
            writer = explain_streaming(trained, adata, tmp, args.method, label_column,
                                       cells_per_class=cells_per_class, seed=args.seed, top_genes=args.top_genes,
                                       progress=progress, **options)
            done.update(summary=writer.summary, tables=writer.tables)
            return
        rows, selection = select_cells(trained, adata, cells_per_class, seed=args.seed,
                                       **_max_missing(args))
        chosen = adata if len(rows) == adata.n_obs else adata[rows].copy()
        result = explain(trained, chosen, args.method, label_column, seed=args.seed, **options)
        summary = write_explanation(result, trained.layout, tmp, top_genes=args.top_genes,
                                    n_missing_genes=len(trained.missing_genes(adata)),
                                    selection=selection)
        done.update(summary=summary, tables={name: result.class_table(trained.layout, name)
                                             for name in result.class_members})

    write_output_dir(out, fill, overwrite=args.overwrite, inputs=command_inputs(args))
    _report_missing(trained, adata)
    summary = done["summary"]
    selection = summary["selection"]
    which = (f"{summary['n_samples']} samples" if selection["cells_per_class"] == "all" else
             f"{summary['n_samples']} of {selection['n_input_cells']} samples (at most "
             f"{selection['cells_per_class']} per predicted class, seed {selection['seed']})")
    print(f"{args.method} gene attribution and {args.pixel_method} pixel saliency of {which} "
          f"({summary['grouping']})")
    for entry in summary["classes"]:
        table = done["tables"][entry["class"]]
        print(f"  {entry['class']} ({entry['n_samples']} samples): top genes {', '.join(table['gene'].head(5))}")
    if summary["classes_without_samples"]:
        print(f"  no samples for {summary['classes_without_samples']}: no table for them")
    print(f"wrote gene tables, saliency maps and explain.json to {out}")
    return 0


class _ExplainProgress:
    """A line on stderr about every tenth of the cells (prediction pass, then explanation)."""

    def __init__(self):
        self.reported = {}

    def __call__(self, event):
        done, total = event.batch + 1, event.n_batches
        step = max(total // 10, 1)
        if done // step > self.reported.get(event.stage, 0) or done == total:
            self.reported[event.stage] = done // step
            verb = "predicted" if event.stage == "predict" else "explained"
            print(f"{verb} {done:,}/{total:,} cells", file=sys.stderr, flush=True)


def _under_torchrun() -> bool:
    import os

    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def add_layout_cells_argument(parser: argparse.ArgumentParser) -> None:
    from .streaming import DEFAULT_LAYOUT_CELLS

    parser.add_argument("--layout-cells", type=int, default=DEFAULT_LAYOUT_CELLS, metavar="N",
                        help="streaming: fit the gene layout on a stratified subsample of this many cells "
                             f"(default {DEFAULT_LAYOUT_CELLS:,})")


def _add_streaming_arguments(parser: argparse.ArgumentParser, *, training: bool) -> None:
    from .cli import add_backed_argument
    from .streaming.loader import DEFAULT_CACHE_GB

    add_backed_argument(parser)
    if not training:
        return
    add_layout_cells_argument(parser)
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="streaming: stop after N optimiser steps in all (default: every epoch)")
    parser.add_argument("--cache-gb", type=float, default=DEFAULT_CACHE_GB, metavar="GB",
                        help="streaming: hold the preprocessed training cells in memory when they take at most "
                             f"this many GB (default {DEFAULT_CACHE_GB:g}; 0: read the file every epoch)")


# ----------------------------------------------------------------- register
def register(sub) -> None:
    """Add the model commands to the ``omicsimage`` parser."""
    from .attribution import BASELINES, DEFAULT_BASELINE, DEFAULT_GENE_METHOD, DEFAULT_STEPS, GENE_METHODS
    from .cli import OVERWRITE_HELP, add_input_arguments, add_layout_arguments
    from .explain import SALIENCY_METHODS
    from .streaming.explain import DEFAULT_CELLS_PER_CLASS

    evaluate = sub.add_parser(
        "evaluate", help="stratified k-fold cross-validation of a CNN on the images, with a baseline",
        description="Cross-validate a CNN (5 stratified folds; --protocol recommended by default: 20 epochs, "
                    "batch 16, Adam lr 1e-3; --protocol paper: the seed paper's 5 epochs, batch 32, lr 1e-4). "
                    "Preprocessing and layout are fitted on each training fold only unless --transductive.")
    add_input_arguments(evaluate)
    add_layout_arguments(evaluate)
    _add_training_arguments(evaluate)
    evaluate.add_argument("--folds", type=int, default=5, help="number of stratified folds (default 5)")
    evaluate.add_argument("--transductive", action="store_true",
                          help="fit preprocessing and layout on ALL samples (the paper's set-up; optimistic)")
    evaluate.add_argument("--compare-model", choices=[m for m in _model_names()], default=None,
                          help="also cross-validate this model on the same folds and run a Wilcoxon test")
    _add_streaming_arguments(evaluate, training=True)
    evaluate.add_argument("--out", required=True, metavar="DIR", help="report folder")
    evaluate.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    evaluate.set_defaults(func=cmd_evaluate)

    train = sub.add_parser("train", help="train a CNN on all samples and save it as one checkpoint file")
    add_input_arguments(train)
    add_layout_arguments(train)
    _add_training_arguments(train)
    _add_streaming_arguments(train, training=True)
    train.add_argument("--devices", type=int, default=1, metavar="N",
                       help="train on N processes with DistributedDataParallel: N GPUs (nccl) when there are, "
                            "else N CPU processes (gloo); --batch-size is the global batch. Also started by "
                            "torchrun (then its processes are used)")
    train.add_argument("--out", required=True, metavar="MODEL_FILE", help="checkpoint file to write (.pt)")
    train.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser("predict", help="predict classes of new samples with a saved model")
    predict.add_argument("model_file", metavar="MODEL_FILE", help="checkpoint written by `omicsimage train`")
    _add_predict_input_arguments(predict)
    predict.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    _add_streaming_arguments(predict, training=False)
    predict.add_argument("--out", required=True, metavar="CSV", help="predictions table to write")
    predict.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    predict.set_defaults(func=cmd_predict)

    explain = sub.add_parser("explain", help="genes ranked by attribution per class, and pixel saliency maps")
    explain.add_argument("model_file", metavar="MODEL_FILE", help="checkpoint written by `omicsimage train`")
    _add_predict_input_arguments(explain)
    explain.add_argument("--method", choices=GENE_METHODS, default=DEFAULT_GENE_METHOD,
                         help=f"gene attribution method, through the renderer onto each gene (default "
                              f"{DEFAULT_GENE_METHOD}); genes are ranked by it")
    explain.add_argument("--baseline", choices=BASELINES, default=DEFAULT_BASELINE,
                         help="baseline of integrated-gradients / gradient-shap: mean (default: the training "
                              "samples' mean profile) or zeros (every gene at its training minimum)")
    explain.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                         help=f"integrated-gradients steps per sample (default {DEFAULT_STEPS}; samples that miss "
                              "completeness by over 1%% are redone with more)")
    explain.add_argument("--pixel-method", choices=SALIENCY_METHODS, default="gradient",
                         help="the paper's pixel saliency, saved as maps and as the pixel_saliency column "
                              "(default gradient: the paper's vanilla saliency)")
    explain.add_argument("--top-genes", type=int, default=50,
                         help="genes per sample in sample_top_genes.csv (default 50)")
    explain.add_argument("--cells-per-class", default=str(DEFAULT_CELLS_PER_CLASS), metavar="N|all",
                         help=f"explain at most N cells per predicted class, a seeded random sample (default "
                              f"{DEFAULT_CELLS_PER_CLASS}: Integrated Gradients costs tens of network passes per "
                              "cell); all: every cell. explain.json says how many were explained")
    explain.add_argument("--seed", type=int, default=0,
                         help="random seed of the cell sample and of seeded noise (smoothgrad, gradient-shap)")
    explain.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    _add_streaming_arguments(explain, training=False)
    explain.add_argument("--out", required=True, metavar="DIR", help="output folder")
    explain.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    explain.set_defaults(func=cmd_explain)


def _model_names():
    from .models import MODEL_NAMES

    return MODEL_NAMES
