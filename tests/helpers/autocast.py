"""CUDA's autocast policy for the ops a NiT uses, emulated on CPU, so CPU tests and benches see GPU dtypes.

CPU autocast runs layer_norm in the input dtype (bf16 in, bf16 out); CUDA autocast puts layer_norm on its fp32 list
(inputs cast to fp32, fp32 out). Every other op of the network gets the same policy on both devices (linear/matmul/SDPA
in bf16; elementwise ops, gelu, embedding untouched), so routing layer_norm through fp32 while CPU autocast is on is the
CUDA behaviour. Use: `with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy(): ...`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_FP32_OPS = {F.layer_norm, torch.layer_norm}


class CudaAutocastPolicy(TorchFunctionMode):
    """While CPU autocast is enabled, run layer_norm in fp32 on fp32-cast inputs, as CUDA autocast does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FP32_OPS and torch.is_autocast_enabled("cpu"):
            def up(a):
                return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)
