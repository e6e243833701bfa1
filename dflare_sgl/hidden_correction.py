"""DFly's hidden-state correction head (AngelSpec's "TreeFlash formula (1)").

A block-diffusion draft predicts every slot of a block at once, so slot i cannot know which
token the draft put at slot i-1. DFly corrects slot i's final hidden state by the embedding
of that token before the ``lm_head`` reads it, which makes drafting one backbone pass plus
B-1 small dependent steps. Used by the reference draft model and the SGLang draft class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dflare_sgl.primitives import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class HiddenCorrection(nn.Module):
    """Block slot i's hidden state, corrected by the token before it.

    ``h' = h + down(silu(gate(c)) * up(c))`` with ``c = [hidden_norm(h); embed_norm(e)]`` and
    e the target embedding of the token at slot i-1 (the anchor for slot 1; the drafted token
    at inference, the true one in training). It makes drafting one backbone pass plus B-1
    small dependent steps: slot i's token is only known after slot i-1's.
    """

    def __init__(self, hidden_size: int, intermediate_size: int | None, eps: float) -> None:
        super().__init__()
        h, inner = hidden_size, intermediate_size or hidden_size  # None: H, as DFly's default
        self.hidden_norm = RMSNorm(h, eps)
        self.embed_norm = RMSNorm(h, eps)
        self.gate_proj = nn.Linear(2 * h, inner, bias=False)
        self.up_proj = nn.Linear(2 * h, inner, bias=False)
        self.down_proj = nn.Linear(inner, h, bias=False)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H]`` and ``prev_embedding [..., H]`` -> corrected ``[..., H]``."""
        prev = self.embed_norm(prev_embedding.to(hidden.dtype))
        c = torch.cat([self.hidden_norm(hidden), prev], -1)
        return hidden + self.down_proj(F.silu(self.gate_proj(c)) * self.up_proj(c))

    def draft(
        self,
        hidden: torch.Tensor,
        anchor_ids: torch.Tensor,
        embed: Callable[[torch.Tensor], torch.Tensor],
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots 1..q-1 of a block, one after another: (corrected states ``[bs, q-1, H]``,
        picked token ids ``[bs, q-1]``).

        ``hidden [bs, q, H]`` are the backbone's states (slot 0 the anchor's), ``anchor_ids
        [bs]`` the block's first token; ``embed`` maps ids ``[bs]`` to target embeddings,
        ``pick`` states to token ids (the head and its argmax). Slot i is corrected by the
        token picked at slot i-1 (the anchor for slot 1)."""
        prev, states, tokens = anchor_ids, [], []
        for i in range(1, hidden.shape[1]):
            states.append(self(hidden[:, i], embed(prev)))
            prev = pick(states[-1])
            tokens.append(prev)
        return torch.stack(states, dim=1), torch.stack(tokens, dim=1)
