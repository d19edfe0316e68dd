"""Numba-CUDA kernels of pycnn, installed as the sub-package ``pycnn.kernels``.

Kept light on purpose: importing pycnn never imports numba.  The modules are imported by
``pycnn.ops.cuda_backend.load()`` the first time the ``cuda`` backend is asked for:

  _launch     launch configuration, device views of arrays, streams, per-dtype builds
  _rawlaunch  the launch path of CuPy arrays: PTX compiled once per signature, cached on disk
  splitmix    the counter-based random numbers (splitmix64) in NumPy: the one formula
  rng         the same numbers as device functions
  reduce      block tree reduction, per-channel sums, fills
  activations one pair of device functions per activation (value, gradient), and the maps,
              prelu, rrelu and maxout built from them
  conv3x3     shared-memory tiled direct 3x3 convolution: forward, input/weight/bias grads
  conv_gemm   conv3x3 as im2col + cuBLAS, the epilogue applying an activation
  conv_igemm  conv3x3 as implicit GEMM (tensor_cores: its TF32 build)
  batchnorm   batch norm statistics, normalisation with an activation, backward
  pool        2x2 max / average pooling, stride 2
  dropout     inverted dropout
  fancy_pca   AlexNet colour augmentation and the dataset RGB moments it needs
  loss        softmax cross-entropy
  optim       the fused optimizer updates (multi-tensor SGD and Adam)
"""

import numpy as _np

# numba-cuda 0.30.4 calls numpy.row_stack, an alias of vstack that NumPy 2.5 removed
# (AttributeError at import).  Put the alias back before any kernel module imports
# numba.cuda; it is the same function, so nothing else in the process changes behaviour.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack
