"""Every op of pycnn, declared once in the registry (see ``registry``).

Importing this package declares the NumPy references and hooks in the backends, which
register their implementations the first time they are asked for; ``routing`` decides
which implementation runs each call.
"""
from pycnn.ops import (  # noqa: F401 (declares)
    activations,
    conv,
    dropout,
    elementwise,
    fancy_pca,
    linear,
    loss,
    norm,
    pool,
    routing,  # noqa: F401 (routes every call: Op.resolve)
)
from pycnn.ops import registry as _registry
from pycnn.ops.registry import REGISTRY, Op, Sample, all_ops, get


def _load_cpp():
    from pycnn.ops import cpp_backend
    cpp_backend.load()


def _load_cuda():
    from pycnn.ops import cuda_backend
    cuda_backend.load()


_registry.add_backend_loader("cpp", _load_cpp)
_registry.add_backend_loader("cuda", _load_cuda)

__all__ = ["REGISTRY", "Op", "Sample", "all_ops", "get"]
