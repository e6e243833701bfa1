"""Loads the optional C++/CUDA extension that registers ``torch.ops.dflare.*``.

``import dflare_sgl`` loads it, so the ops are callable right after the package import (as
``import torchvision`` does for its ops). Every op wrapper asks :func:`has_kernel` before
dispatching to the extension and falls back to its plain PyTorch reference otherwise, so the
package works with no extension built.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

# The ops a decoding step needs on a GPU (skinny_linear is CPU-only).
GPU_OPS = ("layer_mix_kv", "verify_block")
BUILD_HINT = (
    "build them with `DFLARE_CUDA=1 bash scripts/install_package.sh python3` in a clone "
    "(needs nvcc; TORCH_CUDA_ARCH_LIST picks the GPU architectures)"
)


@functools.cache
def extension_loaded() -> bool:
    """True when ``dflare_sgl._C`` imported and registered its ops.

    ``DFLARE_DISABLE_EXT=1`` forces the PyTorch reference path (for A/B checks).
    """
    return _load_error() is None


@functools.cache
def _load_error() -> str | None:
    """Why the extension is not in use (None when it is)."""
    if os.environ.get("DFLARE_DISABLE_EXT") == "1":
        return "DFLARE_DISABLE_EXT=1 is set"
    try:
        from dflare_sgl import _C  # noqa: F401  (import runs the TORCH_LIBRARY registration)
    except ImportError as e:
        return f"dflare_sgl._C does not import ({e})"
    if not (hasattr(torch.ops, "dflare") and hasattr(torch.ops.dflare, "verify_block")):
        return "dflare_sgl._C registered no torch.ops.dflare ops"
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Shape-only (fake / meta) kernels of the ops, so ``torch.compile`` and ``torch.export``
    trace through them without running them."""

    @torch.library.register_fake("dflare::layer_mix_kv")
    def _(hidden, fusion_probs, fc_weight, hidden_norm_weight, k_proj_weight, v_proj_weight,
          k_proj_bias, v_proj_bias, k_norm_weight, eps, positions, cos_sin_cache, slots,
          k_caches, v_caches) -> None:  # fmt: skip
        return None  # writes the caches in place

    @torch.library.register_fake("dflare::verify_block")
    def _(draft_tokens, logits, seq_lens, remaining, temperatures, top_k, top_p, seeds,
          stop_token_ids, block_slots):  # fmt: skip
        bs, block = block_slots.shape
        per_request = [block_slots.new_empty(bs) for _ in range(3)]
        accept_lens, num_committed, new_seq_lens = per_request
        committed, free_slots = block_slots.new_empty(bs, block), block_slots.new_empty(bs, block)
        return accept_lens, committed, num_committed, new_seq_lens, free_slots

    @torch.library.register_fake("dflare::skinny_linear")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])


def _missing_gpu_kernels(device: torch.device | str) -> str | None:
    """What keeps the CUDA kernels from running on ``device`` (None: they run, or not CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    missing = [op for op in GPU_OPS if not has_kernel(op, "cuda")]
    if not missing:
        return None
    why = _load_error() or "the extension was built without CUDA"
    return f"no CUDA kernel for torch.ops.dflare.{{{', '.join(missing)}}}: {why}"


def require_gpu_kernels(device: torch.device | str) -> None:
    """Refuse a CUDA device without the CUDA kernels: the PyTorch references they fall back to
    sync with the host every step, which defeats SGLang's overlap scheduling."""
    missing = _missing_gpu_kernels(device)
    if missing:
        raise RuntimeError(f"dflare_sgl: {missing}; {BUILD_HINT}")


def warn_without_gpu_kernels(device: torch.device | str) -> None:
    """Warn (once per process) that a CUDA device runs the slower PyTorch references."""
    missing = _missing_gpu_kernels(device)
    if missing:
        _warn_once(
            f"dflare_sgl: {missing}; running the PyTorch references (a host sync per step). "
            f"For speed, {BUILD_HINT}"
        )


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def has_kernel(op_name: str, device: torch.device | str) -> bool:
    """Whether ``torch.ops.dflare.<op_name>`` has a kernel for ``device``'s type."""
    return _has_kernel(op_name, torch.device(device).type)


# Cached: the op wrappers ask on every call (skinny_linear ~200 times per decode step), and the
# answer is fixed once the extension has loaded (extension_loaded is cached too).
@functools.cache
def _has_kernel(op_name: str, device_type: str) -> bool:
    if not extension_loaded() or not hasattr(torch.ops.dflare, op_name):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dflare::{op_name}", key)
