"""Type stub of the C++ extension pycnn._C (csrc/).

pycnn/_C.py imports the build of csrc/ that this CPU runs (pycnn._C_avx512, pycnn._C_avx2 or
pycnn._C_generic: pycnn/_cpu.py) and takes over its functions, listed here.

Every kernel writes into output arrays the caller allocated (never allocates), checks that
all arrays are NumPy arrays, C-contiguous, of one dtype (float32 or float64) and of matching
shapes (ValueError / TypeError naming the argument otherwise), and releases the GIL.
"""

import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32 | np.float64]

def build_info() -> dict:
    """What this binary was compiled for: {'variant': 'avx512' | 'avx2' | 'generic', 'isa': [...],
    'sanitize': bool, 'compiler': str, 'openmp': int}."""

def num_threads() -> int:
    """The number of OpenMP threads the kernels use (omp_get_max_threads)."""

def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads for kernels called from this Python thread."""

# ------------------------------------- the rectifiers (csrc/act_rectifiers.cpp)
# ----------------------------------------------------------------------------- relu
def relu_forward(x: _Array, out: _Array) -> None: ...
def relu_backward(x: _Array, grad_out: _Array, grad_in: _Array) -> None: ...

# ----------------------------------------------------------------------- leaky_relu
def leaky_relu_forward(x: _Array, out: _Array, slope: float = 0.01) -> None: ...
def leaky_relu_backward(x: _Array, grad_out: _Array, grad_in: _Array, slope: float = 0.01) -> None: ...

# ---------------------------------------------------------------------------- prelu
# x is (N, C, ...), weight is (C,); grad_weight is overwritten.
def prelu_forward(x: _Array, weight: _Array, out: _Array) -> None: ...
def prelu_backward(x: _Array, weight: _Array, grad_out: _Array, grad_in: _Array, grad_weight: _Array) -> None: ...

# ---------------------------------------------------------------------------- rrelu
# training: slope_i = 1 / (lower + (upper - lower) * counter_uniform(seed)[i]);
# evaluation: slope = 2 / (lower + upper).  The backward regenerates the slopes from seed.
def rrelu_forward(x: _Array, out: _Array, lower: float = 3.0, upper: float = 8.0, seed: int = 0,
                  training: bool = False) -> None: ...
def rrelu_backward(x: _Array, grad_out: _Array, grad_in: _Array, lower: float = 3.0, upper: float = 8.0,
                   seed: int = 0, training: bool = False) -> None: ...

# ------------------------------------------------------------------------------ elu
def elu_forward(x: _Array, out: _Array, alpha: float = 1.0) -> None: ...
def elu_backward(x: _Array, grad_out: _Array, grad_in: _Array, alpha: float = 1.0) -> None: ...

# ------------------------------------------------- random numbers (csrc/random.cpp)
def seed_key(seed: int) -> int:
    """The 64-bit stream key of seed (as pycnn.ops._util.seed_key)."""

def counter_uniform(seed: int, n: int, dtype: npt.DTypeLike = np.float32) -> _Array:
    """n counter-based U[0, 1) numbers (as pycnn.ops._util.uniform); allocates (a test helper)."""

# ------------------------------------------------- conv3x3 (csrc/conv3x3*.cpp)
# x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None, y (N, K, H, W); stride 1, padding 1.
# algo: "direct", "winograd" (F(2x2, 3x3)) or "winograd4" (F(4x4, 3x3)); the kernel names are the
# CUDA backend's (forward / grad_x / grad_weight).
def conv3x3_forward(x: _Array, weight: _Array, bias: _Array | None, y: _Array, algo: str = "direct") -> None: ...
def conv3x3_grad_x(grad_y: _Array, weight: _Array, grad_x: _Array, algo: str = "direct") -> None:
    """grad_x (overwritten): a convolution of grad_y with the flipped, transposed filter, by algo."""
def conv3x3_grad_weight(x: _Array, grad_y: _Array, grad_weight: _Array | None, grad_bias: _Array | None,
                        algo: str = "direct") -> None:
    """grad_weight (K, C, 3, 3) and grad_bias (K,), each overwritten unless None: both read x and
    grad_y, so the bias gradient comes with the weight's.  "winograd4": grad_weight by F(4x4, 3x3)
    (the adjoint of its forward); the others directly."""

# conv3x3_act (csrc/conv3x3_bindings.cpp; the activations: csrc/act_*.cpp): y = act(conv3x3(x) + bias)
# in one pass; activation "relu", "leaky_relu" (slope), "prelu" (prelu_weight (K,), None otherwise),
# "elu" (alpha) or "swish" (an unknown name: ValueError listing the known ones).  pre: None or
# (N, K, H, W) receiving the pre-activation; backward reads `saved` = y (saved_is_pre=False) or the
# pre-activation (saved_is_pre=True), whichever the caller kept: the rule of which is
# pycnn.ops.conv.grad_from_output.  The backward pass is one call: the gradient of the
# pre-activation, computed once, feeds every other.
def conv3x3_act_forward(x: _Array, weight: _Array, bias: _Array | None, prelu_weight: _Array | None, y: _Array,
                        pre: _Array | None, activation: str, slope: float = 0.01, alpha: float = 1.0,
                        algo: str = "direct") -> None: ...
def conv3x3_act_backward(x: _Array, weight: _Array, prelu_weight: _Array | None, saved: _Array, saved_is_pre: bool,
                         grad_y: _Array, grad_x: _Array | None, grad_weight: _Array | None, grad_bias: _Array | None,
                         grad_prelu_weight: _Array | None, activation: str, slope: float = 0.01, alpha: float = 1.0,
                         algo: str = "direct") -> None:
    """Each gradient that is not None is overwritten."""

# (csrc/fma_peak.cpp)
def fma_peak_gflops(iters: int = 10000000) -> float:
    """The float32 FMA peak of the OpenMP threads in GFLOP/s, for the instruction set this build
    runs (AVX-512 zmm, or AVX2 ymm FMAs); NaN without FMA (the generic build)."""

# ------------------------------------------------- batch norm (csrc/batchnorm.cpp)
# x is (N, C) or (N, C, H, W); the per-channel arrays are (C,).
def batchnorm_stats(x: _Array, mean: _Array, var: _Array) -> None:
    """Writes the per-channel mean and biased variance."""
def batchnorm_apply(x: _Array, mean: _Array, scale: _Array, shift: _Array, y: _Array) -> None:
    """y = (x - mean[c]) * scale[c] + shift[c]."""
def batchnorm_backward(x: _Array, mean: _Array, invstd: _Array, gamma: _Array, grad_out: _Array, grad_in: _Array,
                       grad_gamma: _Array, grad_beta: _Array, training: bool) -> None:
    """Gradients of batch norm; training=True includes the dependence of the batch statistics on x."""
# batch norm + an activation of conv3x3_act in one pass (prelu_weight (C,) for "prelu", else None);
# pre: None or an array like x for the pre-activation, which the backward pass needs where
# pycnn.ops.conv.grad_from_output says so (saved is then pre, saved_is_pre=True; else saved is y).
def batchnorm_act_forward(x: _Array, mean: _Array, scale: _Array, shift: _Array, prelu_weight: _Array | None,
                          y: _Array, pre: _Array | None, activation: str, slope: float = 0.01,
                          alpha: float = 1.0) -> None: ...
def batchnorm_act_backward(x: _Array, mean: _Array, invstd: _Array, gamma: _Array, prelu_weight: _Array | None,
                           saved: _Array, saved_is_pre: bool, grad_out: _Array, grad_in: _Array, grad_gamma: _Array,
                           grad_beta: _Array, grad_prelu_weight: _Array | None, training: bool, activation: str,
                           slope: float = 0.01, alpha: float = 1.0) -> None: ...

# --------------------------------------------------- 2x2 pooling (csrc/pool.cpp)
# x (N, C, H, W) -> y (N, C, H//2, W//2); argmax is uint8 shaped like y (0..3, row-major).
def maxpool2x2_forward(x: _Array, y: _Array, argmax: npt.NDArray[np.uint8]) -> None: ...
def maxpool2x2_backward(grad_y: _Array, argmax: npt.NDArray[np.uint8], grad_x: _Array) -> None: ...
def avgpool2x2_forward(x: _Array, y: _Array) -> None: ...
def avgpool2x2_backward(grad_y: _Array, grad_x: _Array) -> None: ...

# ----------------------------------------- sigmoid, tanh (csrc/act_sigmoid_tanh.cpp)
# The backward passes of sigmoid and tanh read x (exact where y rounds to +-1).
def sigmoid_forward(x: _Array, out: _Array) -> None: ...
def sigmoid_backward(x: _Array, grad_out: _Array, grad_in: _Array) -> None: ...
def tanh_forward(x: _Array, out: _Array) -> None: ...
def tanh_backward(x: _Array, grad_out: _Array, grad_in: _Array) -> None: ...
# ------------------------------------------------------- swish (csrc/act_swish.cpp)
# out = x * sigmoid(x) (SiLU), stable for large |x|; the backward pass reads x.
def swish_forward(x: _Array, out: _Array) -> None: ...
def swish_backward(x: _Array, grad_out: _Array, grad_in: _Array) -> None: ...

# ---------------------------------------------- dropout (csrc/dropout.cpp), maxout (csrc/maxout.cpp)
# keep element i where counter_uniform(seed)[i] >= p, scaled by 1 / (1 - p); backward redraws the mask.
def dropout_forward(x: _Array, out: _Array, p: float, seed: int) -> None: ...
def dropout_backward(grad_out: _Array, grad_in: _Array, p: float, seed: int) -> None: ...
# x (N, C*k, ...) -> y (N, C, ...); winner is uint8 shaped like y (k = pieces <= 256).
def maxout_forward(x: _Array, y: _Array, winner: npt.NDArray[np.uint8], pieces: int) -> None: ...
def maxout_backward(grad_y: _Array, winner: npt.NDArray[np.uint8], grad_x: _Array, pieces: int) -> None: ...

# ------------------------------------------------ fancy PCA (csrc/fancy_pca.cpp)
# images (N, 3, H, W) uint8 / float32 / float64 -> out float32 / float32 / float64;
# eigvecs (3, 3), eigvals (3,), alphas (N, 3) float64: out = images + scale * eigvecs @ (alphas[n] * eigvals).
def fancy_pca_apply(images: npt.NDArray, eigvecs: npt.NDArray[np.float64], eigvals: npt.NDArray[np.float64],
                    alphas: npt.NDArray[np.float64], scale: float, out: _Array) -> None: ...
def rgb_moments(images: npt.NDArray, sums: npt.NDArray[np.float64], outer: npt.NDArray[np.float64]) -> int:
    """sums (3,) += sum of the pixels' RGB vectors x, outer (3, 3) += sum of x x^T; returns N*H*W."""
