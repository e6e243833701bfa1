"""SGLang's few-row linears on ``torch.ops.dflare.skinny_linear`` when it runs on a CPU.

A decode step multiplies a few rows (one token per request) by every weight matrix of the
target, a DFLARE verify step ``n`` rows per request, and the draft's greedy head ``n - 1``
rows per request. On a CPU without AMX SGLang runs them on ``F.linear`` / ``torch.matmul``,
whose BLAS re-packs the weights on every call for 2-8 rows: profiled in ``dflare serve`` on
a 2-core AMD EPYC (py-spy, one request, 2-token verify steps), the linears and heads were
~60% of a drafted step, and a 2-row pass over SmolLM2's weights costs 1.65x a 1-row pass on
``F.linear`` against 1.03x on ``skinny_linear`` (``benchmarks/RESULTS.md``, stop 14). So
drafting paid for BLAS's few-row penalty rather than for the draft. With AMX SGLang has its
own packed CPU kernel (``sgl_kernel.weight_packed_linear``) and this module steps aside.

:func:`install` (from :func:`cpu_compat.apply`, CPU only, plain and DFLARE servers alike, so
that the plain server is the like-for-like baseline) routes the unquantized linear method and
the plain lm_head to :func:`dflare_sgl.skinny_linear.skinny_linear`, which is ``F.linear``
for anything the kernel does not take (more than 8 rows, other dtypes, a missing
extension). :func:`greedy_head_tokens` is the draft's greedy head on it (the DFLARE worker
calls it on CPU). ``DFLARE_SKINNY_LINEAR=0`` in the server's environment keeps SGLang's own
linears (the baseline that shows the kernel's share).
"""

from __future__ import annotations

import os

import torch

from dflare_sgl.skinny_linear import skinny_linear

ENV_SWITCH = "DFLARE_SKINNY_LINEAR"


def enabled() -> bool:
    """Whether the CPU server runs its few-row linears on skinny_linear (the default)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def _linear_apply(original, method, layer, x, bias=None):
    """``UnquantizedLinearMethod.apply``: SGLang's last branch on a CPU is ``F.linear``."""
    from sglang.srt.utils import use_intel_amx_backend

    if use_intel_amx_backend(layer):
        return original(method, layer, x, bias)
    return skinny_linear(x, layer.weight, bias)


def _compute_lm_head(original, processor, hidden_states, lm_head, embedding_bias=None, **kw):
    """``LogitsProcessor._compute_lm_head``: only its plain-weight branch (no LoRA, no
    quantized head, no AMX, no fp32 or RL on-policy override), which is a matmul."""
    from sglang.srt.layers.logits_processor import should_apply_lm_head_quant_method
    from sglang.srt.utils import use_intel_amx_backend

    plain = (
        hasattr(lm_head, "weight")
        and not hasattr(lm_head, "set_lora")
        and not should_apply_lm_head_quant_method(lm_head, getattr(lm_head, "quant_method", None))
        and not use_intel_amx_backend(lm_head)
        and not processor.use_fp32_lm_head
        and processor.rl_on_policy_target is None
    )
    if not plain:
        return original(processor, hidden_states, lm_head, embedding_bias, **kw)
    return skinny_linear(hidden_states.to(lm_head.weight.dtype), lm_head.weight)


def greedy_head_tokens(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The argmax token of each row of ``hidden_states [T, H]`` over ``weight [V, H]``
    (one rank's whole vocabulary), ``[T]`` int64."""
    return skinny_linear(hidden_states.to(weight.dtype), weight).argmax(dim=-1)


def install() -> None:
    """Route SGLang's unquantized linears and plain lm_head to skinny_linear (CPU only)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply",
        _linear_apply,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head",
        _compute_lm_head,
        HookType.AROUND,
    )
