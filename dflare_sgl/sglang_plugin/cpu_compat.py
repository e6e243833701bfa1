"""Running SGLang 0.5.23 on a CPU-only machine: everything it needs, in one place.

SGLang's CPU engine is meant for Intel AMX servers with ``sgl-kernel``'s CPU build; on a
plain CPU (this project's CI, a laptop trying DFLARE out) it needs:

* the env var ``SGLANG_USE_CPU_ENGINE=1`` (``device="cpu"`` alone is not enough), and a
  stand-in for the few ``sgl_kernel`` CPU ops it imports at start-up, on ``PYTHONPATH``
  (the scheduler imports ``sgl_kernel`` before plugins load): :func:`engine_env`;
* torch_native as a draft attention backend, and as the default backends: :func:`apply` and
  :func:`adjust_server_args`;
* TARGET_VERIFY in the torch_native attention backend (the DFlash draft block and the
  target verify both run in that mode): :func:`_forward_extend_target_verify`;
* ``Tensor.record_stream`` on CPU tensors (the DFlash worker calls it), and no Triton
  qk-norm+RoPE kernel in DFlash draft attention.

:func:`apply` runs from the plugin's entry point only when SGLang is in CPU mode; a GPU
deployment never executes anything here. Threads: on a small shared box torch's default
OpenMP threads stall GEMMs badly, so :func:`engine_env` defaults ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

# The directory holding the `sgl_kernel` stand-in package (put on PYTHONPATH for CPU).
STANDIN_DIR = Path(__file__).parent / "cpu_standin"
TORCH_NATIVE = "torch_native"


def engine_env(device: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment SGLang processes need on ``device``: a copy of ``environ`` (default
    ``os.environ``) with the CPU settings added when ``device`` is ``"cpu"``."""
    env = dict(os.environ if environ is None else environ)
    if device != "cpu":
        return env
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    paths = [str(STANDIN_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def adjust_server_args(server_args) -> None:
    """CPU defaults on a ServerArgs (or SGLang's resolving recorder): torch_native attention
    for the target and the draft unless the user chose otherwise."""
    if server_args.attention_backend is None:
        server_args.attention_backend = TORCH_NATIVE
    if server_args.speculative_draft_attention_backend is None:
        server_args.speculative_draft_attention_backend = TORCH_NATIVE


def _forward_extend_target_verify(original, backend, q, k, v, layer, forward_batch, *args, **kw):
    """torch_native ``forward_extend`` that also serves TARGET_VERIFY batches.

    In TARGET_VERIFY ``seq_lens`` is the committed prefix and every request appends the same
    number of tokens, with no ``extend_*`` metadata; the extend kernel needs it spelled out.
    """
    if not forward_batch.forward_mode.is_target_verify():
        return original(backend, q, k, v, layer, forward_batch, *args, **kw)
    bs = forward_batch.batch_size
    block = q.shape[0] // bs
    verify = copy.copy(forward_batch)  # shallow: only the three length fields change
    verify.extend_prefix_lens = forward_batch.seq_lens
    verify.extend_seq_lens = torch.full_like(forward_batch.seq_lens, block)
    verify.seq_lens = forward_batch.seq_lens + block
    return original(backend, q, k, v, layer, verify, *args, **kw)


def _record_stream_cpu_safe(original):
    def record_stream(tensor: torch.Tensor, stream) -> None:
        if tensor.device.type != "cpu":  # CPU tensors have no stream to record
            original(tensor, stream)

    return record_stream


def _no_triton_qk_norm_rope(result, attention, *args, **kwargs) -> None:
    attention.use_table_qk_norm_rope = False  # a Triton kernel: no driver on CPU


def apply() -> None:
    """Install the CPU compatibility patches (call only when SGLang runs on CPU)."""
    from sglang.srt.arg_groups.choices import (
        DRAFT_ATTENTION_BACKEND_CHOICES,
        add_draft_attention_backend_choices,
    )
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if TORCH_NATIVE not in DRAFT_ATTENTION_BACKEND_CHOICES:
        add_draft_attention_backend_choices([TORCH_NATIVE])
    HookRegistry.register(
        "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
        _forward_extend_target_verify,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.models.dflash.DFlashAttention.__init__",
        _no_triton_qk_norm_rope,
        HookType.AFTER,
    )
    if not getattr(torch.Tensor.record_stream, "_dflare_cpu_safe", False):
        patched = _record_stream_cpu_safe(torch.Tensor.record_stream)
        patched._dflare_cpu_safe = True
        torch.Tensor.record_stream = patched
