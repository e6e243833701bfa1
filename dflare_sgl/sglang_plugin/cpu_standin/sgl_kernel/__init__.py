"""CPU STAND-IN for ``sgl_kernel``: only for running SGLang on a CPU-only machine.

SGLang 0.5.23 in CPU mode (``SGLANG_USE_CPU_ENGINE=1``) imports a few ``*_cpu`` ops from
``sgl_kernel`` at module import time, but PyPI's ``sgl-kernel`` wheel is CUDA-only. This
package implements the four ops a Llama/Qwen run with DFLASH-style speculation calls, in
plain PyTorch, with the signatures of SGLang's call sites. It is put on ``PYTHONPATH`` by
``dflare_sgl.sglang_plugin.cpu_compat.engine_env`` only when the device is CPU (the
scheduler imports ``sgl_kernel`` before plugins load, so a plugin cannot inject it); a GPU
deployment never sees it. Any other ``*_cpu`` name imports, and raises when called.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+dflare-cpu-standin"


def _packed_spans(req_pool_indices, start_offset, end_offset):
    """Per request: (req_to_token row, slice of its span there, slice in the packed list)."""
    pos = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        yield r, slice(s, e), slice(pos, pos + e - s)
        pos += e - s


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[r_i, start_i:end_i] = out_cache_loc[packed span i]`` for each request."""
    for r, span, packed in _packed_spans(req_pool_indices, start_offset, end_offset):
        req_to_token[r, span] = out_cache_loc[packed].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``out_cache_loc[packed span i] = req_to_token[r_i, start_i:end_i]`` for each request."""
    for r, span, packed in _packed_spans(req_pool_indices, start_offset, end_offset):
        out_cache_loc[packed] = req_to_token[r, span].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
    topk: int,
    num_cols: int,
) -> None:
    """Request i's ``topk * num_cols`` slots from ``seq_lens[i]`` on, packed by request."""
    n = topk * num_cols
    for i, (r, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[i * n : (i + 1) * n] = req_to_token[r, s : s + n].to(out_cache_loc.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every KV buffer b (base address ``data_ptrs[b]``, ``strides[b]`` bytes per slot),
    copy slot ``src_loc[j]`` onto slot ``tgt_loc[j]``."""
    for base, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        for tgt, src in zip(tgt_loc.tolist(), src_loc.tolist(), strict=True):
            if tgt != src:
                ctypes.memmove(base + tgt * stride, base + src * stride, stride)


def __getattr__(name: str):
    if not name.endswith("_cpu"):
        raise AttributeError(f"module 'sgl_kernel' (dflare CPU stand-in) has no attribute {name!r}")

    def not_provided(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by dflare's CPU stand-in (only the ops a "
            "Llama/Qwen target with DFLARE calls on CPU are)"
        )

    return not_provided
