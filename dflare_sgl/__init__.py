"""DFlare block-diffusion speculative decoding for HF transformers and SGLang."""

__version__ = "0.1.0"
