"""``omicsimage histology evaluate|fit|predict``: H&E slides → predicted gene expression.

A SECTION is a legacy ST folder (image + counts_spots_by_genes.tsv.gz +
spot_selection.tsv), a Space Ranger folder, an ``.h5ad`` with
``obsm['spatial']`` (plus ``--image``) or, for ``predict``, a bare slide
image (tiled over the tissue).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import OmicsInputError


def _add_section_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", metavar="FILE", action="append", default=None,
                        help="the H&E image of an .h5ad or Space Ranger SECTION (full resolution); give it once "
                             "per such section, in order")
    parser.add_argument("--um-per-px", type=float, default=None,
                        help="µm per image pixel (default: from the slide, the spot diameter or the spot pitch)")
    parser.add_argument("--spot-diameter-px", type=float, default=None, help="spot diameter in image pixels")
    parser.add_argument("--spot-diameter-um", type=float, default=None,
                        help="physical spot diameter (default: Visium 55 µm, legacy ST 100 µm)")
    parser.add_argument("--spot-pitch-um", type=float, default=None,
                        help="spot centre-to-centre distance (default: Visium 100 µm, legacy ST 200 µm)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .features import BACKBONES, FEATURE_SETS
    from .models import MODELS, REDUCERS

    parser.add_argument("--model", choices=MODELS, default="ridge",
                        help="ridge: PCA + ridge on frozen patch features (HEST, default); finetune: one CNN "
                             "backbone with a linear head trained end to end on the patches (ST-Net)")
    parser.add_argument("--features", default=None,
                        help=f"patch features: {', '.join(FEATURE_SETS)}, joined with '+' (default resnet50, "
                             "HEST's baseline; handcrafted and fourier need no weights; efficientnet-lite0 brings "
                             "its ImageNet weights in a pip package). With --model finetune: the backbone to "
                             f"train, one of {', '.join(BACKBONES)} (default densenet121, as ST-Net)")
    parser.add_argument("--weights", default="imagenet", metavar="imagenet|random|FILE",
                        help="backbone weights: imagenet (torchvision weights API), a local torchvision .pth file, "
                             "or random (a baseline, labelled so in every output)")
    parser.add_argument("--epochs", type=int, default=10, help="--model finetune: passes over the training patches")
    parser.add_argument("--lr", type=float, default=1e-4, help="--model finetune: Adam learning rate")
    parser.add_argument("--input-px", type=int, default=224,
                        help="--model finetune: network input side in pixels (default 224; the patch of --patch-um "
                             "µm is resampled to it; smaller is faster)")
    parser.add_argument("--patch-um", type=float, default=112.0, help="patch side in µm (default 112, as HEST)")
    genes = parser.add_mutually_exclusive_group()
    genes.add_argument("--n-genes", type=int, default=50, help="top highly variable genes of the training sections")
    genes.add_argument("--genes", default=None, help="comma-separated gene symbols to predict instead")
    parser.add_argument("--n-components", type=int, default=256, help="PCA components (default 256, as HEST)")
    parser.add_argument("--reducer", choices=REDUCERS, default="pca",
                        help="pca (default) or incremental-pca (the dual-modality paper's)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="ridge penalty (default HEST's 100 / (features × genes))")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--min-entropy", type=float, default=None,
                        help="Shannon selection (ISG): train on spots whose patch entropy is at least this (bits)")
    select.add_argument("--keep-fraction", type=float, default=None,
                        help="Shannon selection: train on this fraction of spots with the highest entropy")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--batch-size", type=int, default=32, help="patches per feature (or training) batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of random initialisation")


def _config(args):
    from .models import HistologyConfig

    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    return HistologyConfig(model=args.model, features=args.features, weights=args.weights, epochs=args.epochs,
                           lr=args.lr, input_px=args.input_px,
                           patch_um=args.patch_um, n_genes=args.n_genes, genes=genes,
                           n_components=args.n_components, reducer=args.reducer, alpha=args.alpha,
                           min_entropy=args.min_entropy, keep_fraction=args.keep_fraction, device=args.device,
                           batch_size=args.batch_size, seed=args.seed).validate()


def _scale(args):
    from .reading import Scale

    return Scale(args.um_per_px, args.spot_diameter_px, args.spot_diameter_um, args.spot_pitch_um)


def _read_sections(args, paths, *, require_counts=True):
    from .reading import read_section

    images = list(args.image or [])
    sections = []
    for path in paths:
        path = Path(path)
        needs_image = path.suffix == ".h5ad" or (path.is_dir() and (path / "spatial").is_dir() and images)
        image = images.pop(0) if needs_image and images else None
        section = read_section(path, image=image, scale=_scale(args), require_counts=require_counts)
        print(section.describe(), file=sys.stderr)
        for note in section.notes:
            print(f"  {note}", file=sys.stderr)
        sections.append(section)
    if images:
        raise OmicsInputError(f"{len(images)} --image file(s) were not used by any section; give one per "
                              ".h5ad or Space Ranger section.")
    return sections


def _inputs(sections):
    from .reading import section_inputs

    return [p for s in sections for p in section_inputs(s)]


class _Progress:
    def __init__(self, verbose: bool):
        self.verbose, self.last = verbose, 0.0

    def __call__(self, event):
        now = time.monotonic()
        if event.stage in ("fold", "epoch") or (self.verbose and now - self.last > 5):
            self.last = now
            print(event.describe(), file=sys.stderr, flush=True)


# --------------------------------------------------------------- commands
def cmd_evaluate(args) -> int:
    from .evaluation import leave_one_section_out

    config = _config(args)
    out = None
    if args.out:
        from ..outputs import check_output

        out = Path(args.out)
    sections = _read_sections(args, args.sections)
    if out is not None:
        check_output(out, kind="file", inputs=_inputs(sections), overwrite=args.overwrite)
    baseline = None if args.random_baseline == "none" else args.random_baseline
    started = time.perf_counter()
    result = leave_one_section_out(sections, config, random_backbone=baseline, progress=_Progress(args.verbose))
    print(result.format_table(args.best, per_gene=not args.no_per_gene))
    print(f"\n{time.perf_counter() - started:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in result.seconds.items())})")
    if out is not None:
        from ..outputs import write_output_file

        write_output_file(out, lambda tmp: result.per_gene.to_csv(tmp, index=False), overwrite=args.overwrite,
                          inputs=_inputs(sections))
        print(f"wrote per-gene results to {out}")
    return 0


def cmd_fit(args) -> int:
    from ..outputs import check_output
    from .fitting import fit, save_model

    config = _config(args)
    out = Path(args.out)
    check_output(out, kind="file", inputs=[Path(p) for p in args.sections], overwrite=args.overwrite)
    sections = _read_sections(args, args.sections)
    check_output(out, kind="file", inputs=_inputs(sections), overwrite=args.overwrite)
    model = fit(sections, config, progress=_Progress(args.verbose))
    save_model(model, out, overwrite=args.overwrite, inputs=_inputs(sections))
    for note in model.notes:
        print(f"note: {note}")
    print(f"fitted on {model.n_train_spots} spots of {', '.join(model.train_sections)}: {len(model.genes)} genes "
          f"from {config.model_description}; wrote {out}")
    return 0


def cmd_predict(args) -> int:
    from ..outputs import check_output, write_output_file
    from .fitting import load_model

    out = Path(args.out)
    check_output(out, kind="file", inputs=[Path(args.model), Path(args.section)], overwrite=args.overwrite)
    model = load_model(args.model, device=args.device)
    [section] = _read_sections(args, [args.section], require_counts=False)
    check_output(out, kind="file", inputs=_inputs([section]) + [Path(args.model)], overwrite=args.overwrite)
    predictions = model.predict(section, progress=_Progress(args.verbose), device=args.device)
    write_output_file(out, lambda tmp: predictions.write_h5ad(tmp), overwrite=args.overwrite,
                      inputs=_inputs([section]) + [Path(args.model)])
    print(f"predicted {predictions.n_vars} genes for {predictions.n_obs} {section.kind} of {section.name} "
          f"({model.config.model_description}); values: {model.scale}; wrote {out}")
    return 0


def register(sub) -> None:
    histology = sub.add_parser("histology", help="predict gene expression from H&E slides",
                               description=__doc__.splitlines()[0])
    commands = histology.add_subparsers(dest="histology_command", required=True)

    evaluate = commands.add_parser("evaluate", help="leave-one-section-out Pearson r per gene")
    evaluate.add_argument("sections", nargs="+", metavar="SECTION")
    _add_section_arguments(evaluate)
    _add_model_arguments(evaluate)
    evaluate.add_argument("--random-baseline", default="resnet50",
                          help="backbone whose randomly initialised features run in the same folds "
                               "(resnet50, resnet18, ...; 'none' to skip)")
    evaluate.add_argument("--best", type=int, default=10, help="best-predicted genes to list")
    evaluate.add_argument("--no-per-gene", action="store_true", help="leave out the gene × section table")
    evaluate.add_argument("--out", default=None, metavar="CSV", help="also write per-gene results here")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    fit = commands.add_parser("fit", help="fit a slide → expression model on sections")
    fit.add_argument("sections", nargs="+", metavar="SECTION")
    _add_section_arguments(fit)
    _add_model_arguments(fit)
    fit.add_argument("--out", required=True, metavar="MODEL", help="model file to write (e.g. model.pt)")
    fit.add_argument("--overwrite", action="store_true")
    fit.set_defaults(func=cmd_fit)

    predict = commands.add_parser("predict", help="predict expression for every spot (or tile) of a section")
    predict.add_argument("model", metavar="MODEL")
    predict.add_argument("section", metavar="SECTION")
    _add_section_arguments(predict)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--out", required=True, metavar="H5AD", help="predictions.h5ad to write")
    predict.add_argument("--overwrite", action="store_true")
    predict.set_defaults(func=cmd_predict)
