"""Training on several processes with ``torch.nn.parallel.DistributedDataParallel``.

``omicsimage train --devices N`` starts N processes (``torch.multiprocessing``,
spawn), or joins the processes ``torchrun`` started (it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``).  The backend is nccl
with one GPU per process when CUDA has enough devices, gloo on CPUs otherwise.

* Rank 0 fits preprocessing and the layout (one streaming pass and a
  subsample, :mod:`.fit`) and sends them to the others as plain arrays (the
  checkpoint's own state functions), so every rank renders identical images.
* :class:`.loader.CellBatches` deals the shuffled blocks of cells out to the
  ranks like ``DistributedSampler``; every rank reads only its own blocks and
  takes ``batch_size / N`` cells a step, so ``--batch-size`` stays the global
  batch and the learning rate means the same as on one process.
* Every rank holds the preprocessed training cells in memory when they fit
  ``--cache-gb`` (the budget is per process: the blocks a rank draws change
  every epoch, so each one holds them all); rank 0 sends the predicted size
  and the QC mask, so the ranks decide alike and train on the same cells.
* On GPUs BatchNorm layers become ``SyncBatchNorm`` (statistics over the global
  batch, as on one process).  torch has no CPU SyncBatchNorm, so with gloo each
  rank normalises over its share of the batch: that is why a CPU run on N
  processes matches one process only to a tolerance (tests/test_streaming.py).
* Only rank 0 writes the checkpoint, atomically (``checkpoint.save_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from ..checkpoint import layout_state, restore_layout, save_checkpoint
from ..errors import OmicsInputError
from ..models import build_model
from ..outputs import CLAIMING_PROCESS
from ..preprocess import Preprocessor
from ..training import TrainedModel
from .run import StageTimer, fit_inputs, fit_network_streaming, label_codes

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def choose_backend(devices: int, device: str = "auto") -> str:
    """``"nccl"`` when ``devices`` CUDA GPUs exist and the device allows them, else ``"gloo"`` (CPU)."""
    import torch

    wants_gpu = str(device).startswith("cuda") or device == "auto"
    if wants_gpu and torch.cuda.is_available() and torch.cuda.device_count() >= devices:
        return "nccl"
    if str(device).startswith("cuda"):
        raise OmicsInputError(f"--devices {devices} on {device}: only {torch.cuda.device_count()} CUDA device(s) "
                              "here; use fewer devices or --device cpu (CPU processes with gloo).")
    return "gloo"


def available_devices(devices: int, device: str = "auto") -> int:
    """``--devices`` capped at what is here, with a note: the GPUs present, or on CPU the cores this
    process may use (more gloo processes than cores only slow each other down)."""
    import torch

    if devices < 1:
        raise OmicsInputError(f"--devices must be at least 1, got {devices}.")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if str(device).startswith("cuda") or (device == "auto" and gpus):
        have, what = gpus, "GPU(s)"
    else:
        have, what = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, \
            "CPU core(s)"
    if devices > have >= 1:
        print(f"note: --devices {devices}, but this machine has {have} {what}: using {have}", file=sys.stderr)
        return have
    return devices


def train_distributed_cli(args, config, layout_spec: dict, options) -> int:
    """``omicsimage train --devices N`` (or under torchrun): train with DDP and write ``args.out`` from rank 0."""
    import torch.multiprocessing as mp

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this is one rank
        world = int(os.environ["WORLD_SIZE"])
        backend = choose_backend(world, config.device)
        _worker(int(os.environ["RANK"]), world, backend, "env://", args, config, layout_spec, options)
        return 0
    devices = available_devices(int(args.devices), config.device)
    if int(config.batch_size) % devices:
        raise OmicsInputError(f"--batch-size {config.batch_size} does not split over {devices} processes; "
                              f"use a multiple of {devices} (it is the global batch).")
    backend = choose_backend(devices, config.device)
    address = f"tcp://127.0.0.1:{_free_port()}"
    print(f"training on {devices} {'GPUs (nccl)' if backend == 'nccl' else 'CPU processes (gloo)'} with "
          f"DistributedDataParallel, global batch {config.batch_size}", file=sys.stderr)
    os.environ[CLAIMING_PROCESS] = str(os.getpid())  # the workers write the --out this run claimed
    try:
        mp.start_processes(_worker, args=(devices, backend, address, args, config, layout_spec, options),
                           nprocs=devices, join=True, start_method="spawn")
    finally:
        os.environ.pop(CLAIMING_PROCESS, None)
    return 0


def _worker(rank: int, world: int, backend: str, address: str, args, config, layout_spec, options) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ..cli import command_inputs, load_input

    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) and rank == 0 else logging.WARNING,
                        format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    if backend == "gloo":
        # N processes share the cores: one thread each instead of N × all cores fighting
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world)
    try:
        if rank != 0:
            sys.stderr = open(os.devnull, "w")  # one rank reports; the others would repeat it
        adata, label_column = load_input(args)
        classes, y = label_codes(adata, label_column)
        import numpy as np

        rows = np.arange(adata.n_obs)
        timer = StageTimer()
        shared = [None]
        if rank == 0:
            preprocessor, layout, subsample = fit_inputs(adata, rows, y, layout_spec, config, options, timer)
            shared = [{"preprocess": preprocessor.state(), "scaled_mean": preprocessor.scaled_mean_,
                       "qc_passed": preprocessor.qc_passed_, "nonzeros": preprocessor.training_nonzeros_,
                       "layout": layout_state(layout), "subsample": subsample}]
        dist.broadcast_object_list(shared, src=0)  # plain arrays and dicts only
        state = shared[0]
        preprocessor = Preprocessor.from_state(state["preprocess"])
        preprocessor.scaled_mean_ = state["scaled_mean"]
        # QC and the cache's predicted size, so every rank trains on the same cells and decides alike
        preprocessor.qc_passed_, preprocessor.training_nonzeros_ = state["qc_passed"], state["nonzeros"]
        layout = restore_layout(*state["layout"])

        def wrap(model):
            if backend == "nccl":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                return DistributedDataParallel(model, device_ids=[device.index])
            return DistributedDataParallel(model)

        from .._cli_models import _ConsoleProgress

        progress = _ConsoleProgress(True) if rank == 0 else None
        model, history, cancelled = fit_network_streaming(
            adata, rows, y, len(classes), preprocessor, layout, state["subsample"], config, options,
            device=device, progress=progress, rank=rank, world_size=world, wrap=wrap, timer=timer)
        if rank == 0:
            if backend == "nccl":  # SyncBatchNorm back to BatchNorm: the checkpoint is an ordinary network
                model = _plain_batchnorm(model, config, layout.n_channels, len(classes))
            trained = TrainedModel(model=model, preprocessor=preprocessor, layout=layout, classes=classes,
                                   config=config, history=history, cancelled=cancelled,
                                   label_column=label_column, layout_spec=dict(layout_spec),
                                   fill_values=preprocessor.scaled_mean_)
            out = save_checkpoint(trained, Path(args.out), overwrite=args.overwrite, inputs=command_inputs(args))
            last = history[-1] if history else None
            print(f"trained {config.model} on {adata.n_obs} samples × {len(preprocessor.genes_)} genes with "
                  f"{world} processes ({backend}), classes {classes}", file=sys.__stdout__)
            if last is not None:
                print(f"final epoch {last['epoch']}: loss {last['loss']:.4f}, training accuracy (rank 0's "
                      f"share) {last['train_accuracy']:.3f}", file=sys.__stdout__)
            print(f"wrote {out}", file=sys.__stdout__, flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _plain_batchnorm(model, config, n_channels: int, n_classes: int):
    """The same weights in a freshly built network (BatchNorm2d, not SyncBatchNorm)."""
    plain = build_model(config.model, n_channels, n_classes, weights=None)
    plain.load_state_dict(model.state_dict())
    return plain.to(next(model.parameters()).device).eval()
