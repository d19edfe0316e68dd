"""Numba-CUDA kernels of pycnn, installed as the sub-package ``pycnn.kernels``.

Kept light on purpose: importing pycnn never imports numba.  The modules are imported by
``pycnn.ops.cuda_backend.load()`` the first time the ``cuda`` backend is asked for:

  _launch     launch configuration, device views of arrays, streams, per-dtype builds
  rng         the counter-based random numbers (splitmix64) as a device function
  reduce      block tree reduction, per-channel sums, fills
  conv3x3     shared-memory tiled direct 3x3 convolution: forward, input/weight/bias grads
  pool        2x2 max / average pooling, stride 2
  activations relu, leaky_relu, prelu, rrelu, elu, sigmoid, tanh, maxout
  dropout     inverted dropout
  fancy_pca   AlexNet colour augmentation and the dataset RGB moments it needs
"""

import numpy as _np

# numba-cuda 0.30.4 calls numpy.row_stack, an alias of vstack that NumPy 2.5 removed
# (AttributeError at import).  Put the alias back before any kernel module imports
# numba.cuda; it is the same function, so nothing else in the process changes behaviour.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack
