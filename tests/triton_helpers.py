"""What the Triton kernel tests share: the device their tensors live on and whether a kernel can run there."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch

from methods.kernels import INTERPRETED

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def needs_kernel(kernels: ModuleType) -> pytest.MarkDecorator:
    """Skip unless ``kernels`` (a kernel module, with its optional ``triton``) imported Triton and runs on CUDA or
    under the interpreter (TRITON_INTERPRET=1); Triton 3.6's interpreter also needs numpy < 2.4 (it converts loop
    bounds with ``int()`` of a one-element array)."""
    runnable = kernels.triton is not None and (ON_CUDA or INTERPRETED)
    if INTERPRETED and tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4):
        runnable = False
    return pytest.mark.skipif(not runnable, reason="needs triton with CUDA, or TRITON_INTERPRET=1 with numpy < 2.4")
