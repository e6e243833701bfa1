"""Draft checkpoints on disk: config.json + safetensors, in each family's own tensor names.

The model's parameter names are DFlare's / DFlash's tensor names; DFly renames three of them
(:data:`FILE_NAMES`) and exports a frozen copy of the target's embedding, which is kept aside
(``embed_tokens.weight``) for the model to check against the target it is used with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dflare_sgl._files import make_readable

# model parameter name -> tensor name in the family's files (identity where absent).
FILE_NAMES: dict[str, dict[str, str]] = {
    "dfly": {
        "fc.weight": "context_proj.weight",
        "hidden_norm.weight": "context_norm.weight",
        "norm.weight": "final_norm.weight",
    },
}
EMBEDDING = "embed_tokens.weight"


def to_file_names(state: dict[str, torch.Tensor], fusion: str) -> dict[str, torch.Tensor]:
    names = FILE_NAMES.get(fusion, {})
    return {names.get(k, k): v for k, v in state.items()}


def from_file_names(state: dict[str, torch.Tensor], fusion: str) -> dict[str, torch.Tensor]:
    names = {v: k for k, v in FILE_NAMES.get(fusion, {}).items()}
    return {names.get(k, k): v for k, v in state.items()}


def check_exported_embedding(copy: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse a target whose input embedding ``weight`` is not the ``embed_tokens.weight`` a
    DFly checkpoint exported (tolerance: one bf16 rounding, the released copies are bf16)."""
    same = copy.shape == weight.shape
    if same:
        w = weight.detach().to(copy.device, torch.float32)
        same = bool((copy.float() - w).abs().max() <= 2**-7 * w.abs().max())
    if not same:
        raise ValueError(
            f"the draft's exported embed_tokens {tuple(copy.shape)} is not this target's input "
            f"embedding {tuple(weight.shape)}: the draft was trained for another target; use a "
            "draft trained for this one"
        )


def checked_draft_vocab(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``token_ids`` as int64, refused unless 1-D, distinct and inside ``[0, vocab_size)``."""
    if token_ids.dim() != 1 or token_ids.numel() == 0 or token_ids.is_floating_point():
        raise ValueError(
            f"a draft vocabulary is a non-empty 1-D tensor of token ids, got "
            f"{token_ids.dtype} {tuple(token_ids.shape)}"
        )
    ids = token_ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size})")
    if ids.unique().numel() != ids.numel():
        raise ValueError("draft vocabulary ids must be distinct")
    return ids


def check_state(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    path: Path,
    fusion: str,
    format_name: str,
) -> None:
    """Refuse weights (tensor names as on disk) that do not match the model's parameters
    (``expected``: model names and shapes) one to one."""
    expected = to_file_names(expected, fusion)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k]
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{what}: {_preview(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise ValueError(
            f"weights in {path} do not fit the {format_name} format its config.json declares "
            f"({'; '.join(problems)}); check that config.json belongs to these weights"
        )


def saved_dtype(raw: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype config.json records, else the stored tensors'."""
    named = raw.get("dtype") or raw.get("torch_dtype")
    return getattr(torch, named) if isinstance(named, str) else next(iter(state.values())).dtype


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{file} not found: a draft checkpoint directory needs config.json"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [path / f for f in sorted(set(read_json(index).get("weight_map", {}).values()))]
    else:
        raise FileNotFoundError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json: draft "
            "weights must be stored as safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"cannot read draft weights {file} ({e}): the file is missing, truncated or not "
                "safetensors; download or save the checkpoint again"
            ) from e
    return state


def write_checkpoint(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors (tensors already in the family's names)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    make_readable(path / "config.json", path / "model.safetensors")


def _preview(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
