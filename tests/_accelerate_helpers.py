"""Helpers of tests/test_accelerate.py: torchvision's model definitions without its compiled
ops, and the worker of the DistributedDataParallel test (a module-level function, so that
torch.multiprocessing's spawn can import it)."""
from __future__ import annotations

import importlib
import os
import sys
import types

import torch

# torchvision's registrations of its compiled ops (nms, roi_align, ...): they fail beside a torch
# build they were not made for ("operator torchvision::nms does not exist"); the models need none
_STUBBED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def torchvision_models():
    """``torchvision.models``, or None where torchvision is not installed."""
    for name in _STUBBED:
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        return importlib.import_module("torchvision.models")
    except ImportError:
        return None


def small_net(dtype=torch.float32):
    """conv-BN-ReLU-pool twice, flatten, linear: (N, 3, 8, 8) -> (N, 10), all torch.nn."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, dtype=dtype), nn.BatchNorm2d(8, dtype=dtype), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding="same", bias=False, dtype=dtype),
                         nn.BatchNorm2d(16, dtype=dtype), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 2 * 2, 10, dtype=dtype))


def ddp_net():
    """small_net without batch norm (whose batch statistics are each process's own under DDP,
    as with torch's BatchNorm2d): (N, 3, 8, 8) -> (N, 10), float64."""
    nn, dtype = torch.nn, torch.float64
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, dtype=dtype), nn.PReLU(8, dtype=dtype), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 10, dtype=dtype))


def ddp_worker(rank: int, world_size: int, port: int, result_path: str) -> None:
    """One of ``world_size`` processes computing, under DDP (gloo), the gradient of an
    accelerated ddp_net on its share of one batch; rank 0 saves the averaged gradients."""
    import torch.distributed as dist

    import pycnn.torch as pt
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, _ = pt.accelerate(ddp_net())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = ddp_batch()
        share = x.shape[0] // world_size
        rows = slice(rank * share, (rank + 1) * share)
        loss = torch.nn.functional.cross_entropy(ddp(x[rows]), y[rows])
        loss.backward()
        if rank == 0:
            torch.save({name: p.grad for name, p in model.named_parameters()}, result_path)
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts a process then)
    finally:
        dist.destroy_process_group()
    # leave without the interpreter's teardown, where a gloo thread still joinable at exit
    # aborted a worker now and then (SIGABRT, "terminate called without an active exception")
    os._exit(0)


def ddp_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=gen), torch.randint(0, 10, (8,), generator=gen)
