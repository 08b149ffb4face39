"""Training throughput: our pipeline (images rendered on the device per batch) vs the bare backbone.

For each model, on one device, three numbers in images per second:

* **pipeline**: ``training.fit_network`` as cross-validation and ``omicsimage train`` run it — each batch is
  rendered on the device from the expression matrix (``layout.transform(x_batch, device=...)``, one sparse
  product), then a forward/backward/Adam step (mixed precision on CUDA);
* **backbone**: the same network, optimiser and loss on synthetic batches of the same shape that already sit
  on the device — the ceiling for that network on that device;
* **render**: the on-device rendering alone.

``pipeline / backbone`` says what rendering on the fly costs (1.0: nothing).

    python benchmarks/bench_training.py                              # CPU: 64² images, batch 16
    python benchmarks/bench_training.py --device cuda --size 224 --batch-size 64 --samples 2048
    python benchmarks/bench_training.py --quick                      # smoke run

Throughput is measured over ``--epochs`` epochs after one warm-up epoch; the data are synthetic
(``--samples`` × ``--genes``, DeepInsight layout with a PCA feature extractor, which is fast to fit and renders
like any other gene layout).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_omicsimage.layouts import DeepInsightLayout  # noqa: E402
from napari_omicsimage.models import build_model, resolve_device  # noqa: E402
from napari_omicsimage.training import ImageBatches, TrainConfig, _autocast, fit_network  # noqa: E402


def _synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_data(n_samples: int, n_genes: int, n_classes: int, seed: int = 0):
    """Expression in [0, 1] with a class signal in a few genes, and labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % n_classes
    x = rng.random((n_samples, n_genes), dtype=np.float32)
    x[:, : 5 * n_classes] += 0.5 * (y[:, None] == (np.arange(5 * n_classes) // 5)[None, :])
    return np.clip(x, 0, 1).astype(np.float32), y


def pipeline_throughput(batches: ImageBatches, y, n_classes: int, config: TrainConfig) -> float:
    """Images per second of ``fit_network`` over ``config.epochs`` epochs (after a one-epoch warm-up)."""
    from dataclasses import replace

    fit_network(batches, y, n_classes, 1, replace(config, epochs=1, recalibrate_batchnorm=False))
    _synchronise(batches.device)
    start = time.perf_counter()
    fit_network(batches, y, n_classes, 1, replace(config, recalibrate_batchnorm=False))
    _synchronise(batches.device)
    return len(y) * config.epochs / (time.perf_counter() - start)


def backbone_throughput(model_name: str, device, shape: tuple, n_classes: int, steps: int,
                        config: TrainConfig) -> float:
    """Images per second of forward/backward/Adam steps on synthetic batches already on ``device``."""
    import torch

    torch.manual_seed(0)
    model = build_model(model_name, shape[1], n_classes).to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    use_amp = bool(config.mixed_precision and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    images = torch.rand(shape, device=device)
    targets = torch.arange(shape[0], device=device) % n_classes

    def step():
        optimiser.zero_grad(set_to_none=True)
        with _autocast(device, use_amp):
            loss = loss_fn(model(images).float(), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        else:
            loss.backward()
            optimiser.step()

    for _ in range(max(2, steps // 10)):  # warm-up (cuDNN autotuning, allocator)
        step()
    _synchronise(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronise(device)
    return shape[0] * steps / (time.perf_counter() - start)


def render_throughput(batches: ImageBatches, batch_size: int, repeats: int = 3) -> float:
    """Images per second of on-device rendering alone, batch by batch over every sample."""
    import torch

    n = len(batches)
    index = torch.arange(n, device=batches.device)
    batches.get(index[:batch_size])  # warm-up
    _synchronise(batches.device)
    start = time.perf_counter()
    for _ in range(repeats):
        for b in range(0, n, batch_size):
            batches.get(index[b:b + batch_size])
    _synchronise(batches.device)
    return n * repeats / (time.perf_counter() - start)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "resnet18", "efficientnet_b0"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small CNN, 64 samples, 16² images")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.samples, args.genes, args.size, args.epochs = ["small"], 64, 300, 16, 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x, y = synthetic_data(args.samples, args.genes, args.classes)
    genes = [f"g{i}" for i in range(args.genes)]
    layout = DeepInsightLayout(size=args.size, feature_extractor="pca").fit(x, genes)
    batches = ImageBatches(device, layout=layout, x=x)
    render = render_throughput(batches, args.batch_size)
    steps_per_epoch = -(-args.samples // args.batch_size)

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    lines = [f"Training throughput on {where}: {args.samples} samples × {args.genes:,} genes, "
             f"{args.size}² images, batch {args.batch_size}, {args.epochs} timed epoch(s); torch {torch.__version__}",
             "",
             "| model | device | image | batch | pipeline (img/s) | backbone on synthetic batches (img/s) | "
             "pipeline / backbone | render alone (img/s) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for model_name in args.models:
        config = TrainConfig(model=model_name, epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                             device=str(device))
        pipeline = pipeline_throughput(batches, y, args.classes, config)
        backbone = backbone_throughput(model_name, device, (args.batch_size, 1, args.size, args.size),
                                       args.classes, steps_per_epoch * args.epochs, config)
        lines.append(f"| {model_name} | {device.type} | {args.size}² | {args.batch_size} | {pipeline:,.0f} | "
                     f"{backbone:,.0f} | {pipeline / backbone:.2f} | {render:,.0f} |")
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print()
    print(report)
    return report


if __name__ == "__main__":
    main()
