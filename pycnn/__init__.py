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
from pycnn import _moved, ops  # noqa: F401 (ops declares every op)
from pycnn.device import BACKENDS, use_backend
from pycnn._cpu import cpu_info  # which build of the C++ backend runs, and why
from pycnn._threads import threads
from pycnn.autograd import Function, Tensor, apply_op, from_dlpack, is_grad_enabled, no_grad, profile
from pycnn.random import manual_seed

__version__ = "0.2.0"

__all__ = ["BACKENDS", "Function", "Tensor", "apply_op", "cpu_info", "from_dlpack", "is_grad_enabled", "manual_seed",
           "no_grad", "profile", "threads", "use_backend", "__version__"]

_moved.install()  # import pycnn.augment etc. (old paths) still work


def __getattr__(name):
    return _moved.attribute(name)
