"""DFlare block-diffusion speculative decoding for HF transformers and SGLang."""

from dflare_sgl import _ext
from dflare_sgl.bundled import bundled_draft

__version__ = "0.1.0"
__all__ = ["bundled_draft"]

# Importing the package registers torch.ops.dflare.* when the C++ extension is built, as
# `import torchvision` does for its ops; without it (or with DFLARE_DISABLE_EXT=1) the op
# wrappers use their PyTorch references.
_ext.extension_loaded()
