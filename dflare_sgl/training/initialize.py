"""Where a training run starts, other than a fresh random draft.

``--init-draft DIR``: from a trained draft's weights (e.g. pretrained on ShareGPT's own replies,
then fine-tuned on regenerated data). The optimizer, schedule and step count start afresh.

``--init-from-target``: from the target's own upper layers.

The draft's decoder layers have the target's width, heads and MLP size (DraftConfig.for_target),
so draft layer i can start as a copy of target layer ``L - D + i``: attention and MLP weights,
both layer norms, and the context projections ``k/v_proj_target`` from that layer's ``k/v_proj``.
The final norm is the target's too, so the draft's output starts on the scale the shared
``lm_head`` expects (a fresh RMSNorm of ones starts at cross-entropy ~60 on SmolLM2). The
draft's per-head q/k norms (the references' Qwen3-style attention) have no target
counterpart and stay at ones. A starting point to test, not a function-preserving copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from dflare_sgl.draft_model import DFlareDraftModel

# What a run's flags decide about a draft's shape (flag name for the error message).
_ARCHITECTURE = {
    "fusion": "--fusion",
    "num_hidden_layers": "--layers",
    "target_layer_ids": "--captured-layers",
    "block_size": "--block-size",
    "hidden_size": "--target",
    "vocab_size": "--target",
    "mask_token_id": "--target",
}


@torch.no_grad()
def init_from_draft(draft: DFlareDraftModel, path: str | Path) -> None:
    """Copy a saved draft's weights (not its draft vocabulary) into ``draft``; its shape must be
    the one the run's flags ask for (ValueError naming the flags to change otherwise)."""
    saved = DFlareDraftModel.from_pretrained(path, dtype=torch.float32)
    diff = {
        flag: f"{name} {getattr(saved.config, name)!r} vs {getattr(draft.config, name)!r}"
        for name, flag in _ARCHITECTURE.items()
        if getattr(saved.config, name) != getattr(draft.config, name)
    }
    if diff:
        raise ValueError(
            f"--init-draft {path}: the saved draft does not have this run's shape "
            f"({'; '.join(diff.values())}): set {', '.join(sorted(diff))} to match it"
        )
    # Weights only: a reduced draft vocabulary is chosen by this run (`--draft-vocab-size`) or
    # after training (`dflare draft-vocab`).
    saved.set_draft_vocab(None)
    draft.load_state_dict(saved.state_dict())


_COPIED = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


@torch.no_grad()
def init_from_target(draft: DFlareDraftModel, target: PreTrainedModel) -> list[int]:
    """Copy the target's top ``D`` decoder layers (and final norm) into ``draft``; returns the
    target layer ids used. Raises ValueError when a shape differs (a narrowed draft)."""
    layers = target.base_model.layers
    first = len(layers) - len(draft.layers)
    sources = list(range(first, len(layers)))
    pairs = []
    for mine, theirs in zip(draft.layers, (layers[j] for j in sources), strict=True):
        pairs += [(mine.get_submodule(n), theirs.get_submodule(n)) for n in _COPIED]
        if hasattr(mine.self_attn, "k_proj_target"):  # DFlare only; DFlash reuses k/v_proj
            pairs.append((mine.self_attn.k_proj_target, theirs.self_attn.k_proj))
            pairs.append((mine.self_attn.v_proj_target, theirs.self_attn.v_proj))
    pairs.append((draft.norm, target.base_model.norm))
    for mine, theirs in pairs:
        for name, p in mine.named_parameters(recurse=False):
            src = getattr(theirs, name, None)
            if src is None or src.shape != p.shape:
                raise ValueError(
                    f"--init-from-target: draft {name} {tuple(p.shape)} has no same-shape "
                    "counterpart in the target; train without --init-from-target"
                )
            p.copy_(src.to(p.dtype))
    return sources
