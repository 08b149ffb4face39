"""CLI command ``omicsimage demo``: the pipeline on the bundled data, in napari or headless."""

from __future__ import annotations

import sys

from .errors import OmicsInputError


def cmd_demo(args) -> int:
    from .demo import run_demo, write_demo_outputs

    if args.headless:
        if args.out is None:
            raise OmicsInputError("--headless writes files: give --out DIR.")
        from .outputs import check_output

        out = check_output(args.out, kind="dir", overwrite=args.overwrite)
        result = run_demo(epochs=args.epochs, device=args.device)
        write_demo_outputs(result, out, overwrite=args.overwrite)
        print(f"wrote images, model, saliency, gene tables and figures to {out}")
        return 0
    if args.out is not None:
        raise OmicsInputError("--out is for --headless; the window shows the results instead.")
    # Train before any window exists: torch's libraries load before napari's OpenGL context.
    result = run_demo(epochs=args.epochs, device=args.device)
    from .demo import show_demo

    print("opening napari: hover the image for genes; see docs/napari.md", file=sys.stderr)
    show_demo(result)
    return 0


def register(sub) -> None:
    """Add the demo command to the ``omicsimage`` parser."""
    from .cli import OVERWRITE_HELP
    from .demo import DEMO_EPOCHS

    demo = sub.add_parser(
        "demo", help="run the whole pipeline on the bundled PBMC data and open it in napari",
        description="Load scanpy's pbmc68k_reduced (700 cells, 10 cell types), train a small CNN on DeepInsight "
                    "images of 80% of the cells, predict all, compute saliency and open napari with images, "
                    "saliency and gene-density layers ready to hover. --headless --out DIR writes the same "
                    "results and PNG figures instead of opening a window.")
    demo.add_argument("--headless", action="store_true", help="write files instead of opening napari")
    demo.add_argument("--out", metavar="DIR", help="output folder (with --headless)")
    demo.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    demo.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=f"training epochs (default {DEMO_EPOCHS})")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    demo.set_defaults(func=cmd_demo)
