"""pycnn: compiled kernels for convolutional networks, with a thin autograd layer.

    import numpy as np, pycnn
    import pycnn.functional as F
    x = pycnn.Tensor(np.random.rand(8, 3, 32, 32).astype(np.float32))
    w = pycnn.Tensor(np.random.randn(16, 3, 3, 3).astype(np.float32) * 0.1, requires_grad=True)
    loss = F.relu(F.conv3x3(x, w)).mean()
    loss.backward()          # w.grad now holds d loss / d w

Layout: the core is here (``Tensor`` and autograd, ``ops`` -- the op specs and the backends
that implement them --, ``functional``, ``nn``, ``optim``, ``schedules``, ``initializers``,
``models``, ``torch``); ``pycnn.data`` holds datasets, the loader, augmentation and
pre-processing; ``pycnn.training`` the configuration, the training loop, the command line,
checks, figures and tools; ``pycnn.bench`` the harness behind ``pycnn bench``; the Numba-CUDA
kernels are ``pycnn.kernels``.
"""
from pycnn import _startup  # noqa: F401, I001 (first: Ctrl-C while the pycnn command starts is one line)
from pycnn import functional, initializers, models, nn, ops, optim, schedules  # noqa: F401 (the core's modules)
from pycnn._cpu import cpu_info  # which build of the C++ backend runs, and why
from pycnn._threads import threads
from pycnn.autograd import Function, Tensor, apply_op, from_dlpack, is_grad_enabled, no_grad
from pycnn.device import BACKENDS
from pycnn.ops.routing import use_backend
from pycnn.profiler import profile
from pycnn.random import manual_seed

__version__ = "0.3.0"

__all__ = ["BACKENDS", "Function", "Tensor", "apply_op", "cpu_info", "from_dlpack", "functional", "initializers",
           "is_grad_enabled", "manual_seed", "models", "nn", "no_grad", "optim", "profile", "schedules", "threads",
           "use_backend", "__version__"]
