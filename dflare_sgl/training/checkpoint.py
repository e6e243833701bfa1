"""Training checkpoints: the draft in its published format plus the state to resume exactly.

    OUT/checkpoints/step-000100/config.json           DFlareDraftModel.save_pretrained
    OUT/checkpoints/step-000100/model.safetensors     (AngelSlim / z-lab loadable)
    OUT/checkpoints/step-000100/trainer_state.pt      optimizer, scheduler, step, RNG states

Weights and optimizer state are gathered into full (unsharded) tensors with
``torch.distributed.checkpoint.state_dict``, so a checkpoint written by N FSDP ranks resumes on
any number of ranks, and one process writes it. The data order needs only the step
(:mod:`dflare_sgl.training.loader`). A checkpoint folder is written under a temporary name and
renamed, so a killed run never leaves a half-written one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.training.distributed import Dist, barrier

TRAINER_STATE = "trainer_state.pt"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# DraftConfig fields that fix the parameter shapes and what the draft computes.
_SHAPE_FIELDS = (
    "fusion",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "block_size",
    "target_layer_ids",
    "mask_token_id",
)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*[0-9]"))
    return found[-1] if found else None


def export_draft(
    state: dict[str, torch.Tensor],
    config: DraftConfig,
    path: Path,
    embedding: torch.Tensor | None = None,
) -> None:
    """Write full ``state`` as a published draft checkpoint folder (``embedding``: see
    ``DFlareDraftModel.save_pretrained``)."""
    with torch.device("meta"):
        draft = DFlareDraftModel(config)
    draft.load_state_dict(state, assign=True)
    draft.save_pretrained(path, embedding)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 weights on the CPU (a collective under FSDP: every rank calls it)."""
    return get_model_state_dict(model, options=_FULL)


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: DraftConfig,
    d: Dist,
    keep: int = 2,
) -> Path:
    """Write ``checkpoint_dir(out, step)`` (all ranks call; rank 0 writes); keep the newest
    ``keep`` checkpoints."""
    weights = full_model_state(model)
    optim = get_optimizer_state_dict(model, optimizer, options=_FULL)
    final = checkpoint_dir(out, step)
    if d.is_main:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_draft(weights, config, tmp)
        state = {
            "step": step,
            "optimizer": optim,
            "scheduler": scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
        }
        torch.save(state, tmp / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted((out / "checkpoints").glob("step-*[0-9]"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def check_same_shape(folder: Path, config: DraftConfig) -> None:
    """Refuse to resume from a checkpoint whose draft differs from the one asked for."""
    saved = DraftConfig.from_dict(json.loads((folder / "config.json").read_text()))
    diff = [
        f"{k} {getattr(saved, k)} (asked {getattr(config, k)})"
        for k in _SHAPE_FIELDS
        if getattr(saved, k) != getattr(config, k)
    ]
    if diff:
        raise ValueError(
            f"cannot --resume from {folder}: its draft has another shape ({'; '.join(diff)}); "
            "repeat the original --layers/--fusion/--block-size, or train into a new --out"
        )


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: DraftConfig,
) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from."""
    check_same_shape(folder, config)
    weights = DFlareDraftModel.from_pretrained(folder, dtype=torch.float32).state_dict()
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])
