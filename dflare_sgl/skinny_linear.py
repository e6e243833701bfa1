"""A linear layer for the few rows of a CPU decode step or verify pass.

A decode step multiplies one token's activations by every weight matrix of the target, a
speculative verify pass a handful (the block, B <= 8 on CPU). Both are bound by reading the
weights from memory. Measured on a 2-core AMD EPYC (``benchmarks/RESULTS.md``), torch's
BLAS reads them at well under the machine's bandwidth (GEMV for one row) and re-packs
them on every call for 2-8 rows, so a 4-token verify pass costs ~1.4x a 1-token decode.
``torch.ops.dflare.skinny_linear`` reads each weight row once for all rows of ``x``.

:func:`skinny_linear` is ``F.linear`` with that kernel for float32 CPU inputs of at most
:data:`MAX_ROWS` rows outside autograd, and ``F.linear`` (the reference) for everything else:
GPUs, training, prefill, other dtypes. :func:`use_skinny_linear` switches a model's
``nn.Linear`` layers to it in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dflare_sgl._ext import has_kernel

# Rows of x the kernel takes (kSkinnyLinearMaxRows in csrc/dflare_ops.h).
MAX_ROWS = 8


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear``: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` or None -> ``[..., N]``.

    Uses the kernel when every tensor is float32 on CPU, ``x`` has 1 to :data:`MAX_ROWS`
    rows (the product of its leading dims) and no gradient is needed; the result then equals
    ``F.linear``'s to float32 rounding (another summation order), not bit for bit.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    use_kernel = (
        1 <= rows <= MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and has_kernel("skinny_linear", x.device)
    )
    if not use_kernel:
        return F.linear(x, weight, bias)
    y = torch.ops.dflare.skinny_linear(
        x.reshape(rows, k).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


class SkinnyLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward is :func:`skinny_linear`; same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


def use_skinny_linear(*models: torch.nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``models`` (a target and its draft, say) to
    :class:`SkinnyLinear`, in place.

    Only the class changes: parameters (tied ones included), hooks and state-dict keys stay
    as they are, so each model computes the same function and saves the same checkpoint.
    Subclasses of ``nn.Linear`` (quantized or LoRA layers) are left alone. Returns how many
    layers were switched.
    """
    switched = 0
    for model in models:
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = SkinnyLinear
                switched += 1
    return switched
