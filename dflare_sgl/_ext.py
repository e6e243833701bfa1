"""Loads the optional C++/CUDA extension that registers ``torch.ops.dflare.*``.

``import dflare_sgl`` loads it, so the ops are callable right after the package import (as
``import torchvision`` does for its ops). Every op wrapper asks :func:`has_kernel` before
dispatching to the extension and falls back to its plain PyTorch reference otherwise, so the
package works with no extension built.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def extension_loaded() -> bool:
    """True when ``dflare_sgl._C`` imported and registered its ops.

    ``DFLARE_DISABLE_EXT=1`` forces the PyTorch reference path (for A/B checks).
    """
    if os.environ.get("DFLARE_DISABLE_EXT") == "1":
        return False
    try:
        from dflare_sgl import _C  # noqa: F401  (import runs the TORCH_LIBRARY registration)
    except ImportError:
        return False
    return hasattr(torch.ops, "dflare") and hasattr(torch.ops.dflare, "verify_block")


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
