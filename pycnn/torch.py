"""pycnn inside PyTorch: its ops as torch operators, its layers as torch.nn.Modules, and
``accelerate(model)``, which runs an existing torch model's layers on pycnn's kernels.

    import torch, torchvision, pycnn.torch as pt
    model, report = pt.accelerate(torchvision.models.resnet18(num_classes=10))
    print(report)                        # what runs on pycnn, what was left and why
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()                      # pycnn's backward kernels fill the same Parameters' .grad

Or by hand:

    net = torch.nn.Sequential(pt.Conv3x3(3, 16), pt.BatchNorm2d(16), pt.ReLU(inplace=True),
                              pt.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 10))

Where the parts live:

* ``pycnn._torch.library``: the layers' ops (conv3x3, conv3x3_act, batchnorm, batchnorm_act,
  the activations, the 2x2 poolings) registered with ``torch.library`` as ``torch.ops.pycnn.*``
  (real kernel, fake kernel, autograd formula), so ``torch.compile(fullgraph=True)``,
  ``torch.export``, ``torch.fx`` and ``torch.jit.trace`` see them, meta tensors run them, and
  channels_last, empty batches and bfloat16 (CPU autocast) are handled;
* ``pycnn._torch.layers``: the functions (``conv3x3``, ``relu``, ``max_pool2x2``, ...) and the
  layers with torch's constructor signatures (``Conv3x3`` is a ``torch.nn.Conv2d``,
  ``BatchNorm2d`` a ``torch.nn.BatchNorm2d``);
* ``pycnn._torch.accelerate``: ``accelerate`` and its ``Report``;
* ``pycnn._torch.function``: ``apply_op(name, *tensors, **params)``, any registry op eagerly
  through a ``torch.autograd.Function`` (``function(name)``), for the ops without an operator
  (losses, arithmetic, reshapes: an output may be a view of an input there).

Random ops (``rrelu``, ``dropout``) draw a seed per call from pycnn's generator
(``pycnn.manual_seed``), as pycnn.nn does, not from torch's.
"""
from __future__ import annotations

from pycnn._torch.accelerate import Report, accelerate
from pycnn._torch.function import apply_op, function
from pycnn._torch.layers import (
           FUNCTIONS,
           LAYERS,
           BatchNorm2d,
           BatchNormAct2d,
           Conv3x3,
           Conv3x3Act,
           Dropout,
           batch_norm,
           conv3x3,
           conv3x3_act,
           dropout,
           linear,
)

globals().update(FUNCTIONS)
globals().update(LAYERS)
MaxPool2d, AvgPool2d = LAYERS["MaxPool2"], LAYERS["AvgPool2"]  # torch's names: kernel_size=2, stride 2 only

__all__ = ["AvgPool2d", "BatchNorm2d", "BatchNormAct2d", "Conv3x3", "Conv3x3Act", "Dropout", "MaxPool2d", "Report",
           "accelerate", "apply_op", "batch_norm", "conv3x3", "conv3x3_act", "dropout", "function", "linear",
           *FUNCTIONS, *LAYERS]
