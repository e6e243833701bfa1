"""Running SGLang 0.5.23 on a CPU-only machine: everything it needs, in one place.

SGLang's CPU engine is meant for Intel AMX servers with ``sgl-kernel``'s CPU build; on a
plain CPU (this project's CI, a laptop trying DFLARE out) it needs:

* the env var ``SGLANG_USE_CPU_ENGINE=1`` (``device="cpu"`` alone is not enough), and a
  stand-in for the few ``sgl_kernel`` CPU ops it imports at start-up, on ``PYTHONPATH``
  (the scheduler imports ``sgl_kernel`` before plugins load): :func:`engine_env`;
* torch_native as a draft attention backend, and as the default backends: :func:`apply` and
  :func:`adjust_server_args`;
* TARGET_VERIFY in the torch_native attention backend (the DFlash draft block and the
  target verify both run in that mode): :func:`_forward_extend_target_verify`, with the
  attention of its few new rows only (:func:`_block_attention`);
* ``Tensor.record_stream`` on CPU tensors (the DFlash worker calls it), and no Triton
  qk-norm+RoPE kernel in DFlash draft attention;
* not needed but wanted: the few-row linears on the project's CPU kernel
  (:mod:`.cpu_linears`), in plain and DFLARE servers alike.

:func:`apply` runs from the plugin's entry point only when SGLang is in CPU mode; a GPU
deployment never executes anything here. Threads: on a small shared box torch's default
OpenMP threads stall GEMMs badly, so :func:`engine_env` defaults ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import contextvars
import copy
import os
from pathlib import Path

import torch
from torch.nn.functional import scaled_dot_product_attention

from dflare_sgl.sglang_plugin import cpu_linears

# The directory holding the `sgl_kernel` stand-in package (put on PYTHONPATH for CPU).
STANDIN_DIR = Path(__file__).parent / "cpu_standin"
TORCH_NATIVE = "torch_native"
# Set while torch_native's extend attention serves a TARGET_VERIFY batch.
_IN_TARGET_VERIFY = contextvars.ContextVar("dflare_in_target_verify", default=False)


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
    token = _IN_TARGET_VERIFY.set(True)
    try:
        return original(backend, q, k, v, layer, verify, *args, **kw)
    finally:
        _IN_TARGET_VERIFY.reset(token)


def _block_attention(
    original,
    backend,
    query,
    output,
    k_cache,
    v_cache,
    req_to_token,
    req_pool_indices,
    seq_lens,
    extend_prefix_lens,
    extend_seq_lens,
    encoder_lens=None,
    scaling=None,
    enable_gqa=False,
    causal=False,
    is_cross_attn=False,
    sliding_window_size=None,
):
    """torch_native's extend attention for a TARGET_VERIFY batch: each request's ``e`` new
    rows against its ``L`` keys (``[e, L]`` scores, causal rows offset by the prefix).

    torch_native pads every request's queries to all ``L`` positions and runs a causal
    ``[L, L]`` attention, keeping the last ``e`` rows: right for a prefill, but for a verify
    block of 1-8 rows over a context of hundreds it makes one decode step cost 2-3x a plain
    one at 16 requests on this CPU. Same rows, same masks; other extends (prefills) and
    sliding-window or cross attention take SGLang's own path."""
    args = (query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens)
    args += (extend_prefix_lens, extend_seq_lens, encoder_lens)
    if not _IN_TARGET_VERIFY.get() or encoder_lens is not None or sliding_window_size is not None:
        return original(
            backend, *args, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
            is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size,
        )  # fmt: skip
    heads_first = query.movedim(0, 1)  # [heads, tokens, head_dim]
    start = 0
    rows = zip(req_pool_indices.tolist(), seq_lens.tolist(), extend_prefix_lens.tolist(),
               extend_seq_lens.tolist())  # fmt: skip
    for pool_index, kv_len, prefix, new in rows:
        slots = req_to_token[pool_index, :kv_len]
        key = k_cache[slots].movedim(0, 1).to(query.dtype)
        value = v_cache[slots].movedim(0, 1).to(query.dtype)
        mask = None
        if causal and new > 1:  # row i sees the prefix and new rows 0..i
            keys = torch.arange(kv_len, device=query.device)
            mask = keys[None, :] <= prefix + torch.arange(new, device=query.device)[:, None]
        out = scaled_dot_product_attention(
            heads_first[None, :, start : start + new],
            key[None],
            value[None],
            attn_mask=mask,
            enable_gqa=enable_gqa,
            scale=scaling,
        )
        output[start : start + new] = out[0].movedim(0, 1)
        start += new
    return output


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
        "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
        "_run_sdpa_forward_extend",
        _block_attention,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.models.dflash.DFlashAttention.__init__",
        _no_triton_qk_norm_rope,
        HookType.AFTER,
    )
    if cpu_linears.enabled():
        cpu_linears.install()
    if not getattr(torch.Tensor.record_stream, "_dflare_cpu_safe", False):
        patched = _record_stream_cpu_safe(torch.Tensor.record_stream)
        patched._dflare_cpu_safe = True
        torch.Tensor.record_stream = patched
