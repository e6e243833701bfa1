"""A reduced draft vocabulary: the N target tokens the draft may propose (EAGLE-3's idea).

The target's responses in a ``dflare gen-data`` folder use a small part of its vocabulary
(SmolLM2-135M-Instruct: ~11k distinct tokens in 316k response tokens of a 49k vocabulary, the
top 8192 covering 99.1%). Restricting the draft's token head to the most frequent ones cuts a
fixed cost of every CPU step, the ``[B-1, H] x [H, V]`` head product, by V / N, and loses
only the rare steps where the target's next token falls outside: the target still commits it.

    dflare draft-vocab --data DATA --draft DRAFT --size 8192
"""

from __future__ import annotations

from pathlib import Path

import torch

from dflare_sgl.training.data import load_sequences, read_metadata


def response_token_counts(folder: str | Path, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the responses (``loss_mask``) of a gen-data folder.

    Returns int64 ``[vocab_size]``; refuses ids outside the vocabulary (data made for another
    target).
    """
    folder = Path(folder)
    read_metadata(folder)
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for sequence in load_sequences(folder):
        # Target-labelled text: the target's tokens there, which the draft is to propose.
        labels = sequence.input_ids if sequence.target_ids is None else sequence.target_ids
        response = labels[sequence.loss_mask]
        if response.numel() and int(response.max()) >= vocab_size:
            raise ValueError(
                f"{folder} holds token id {int(response.max())} outside the draft's vocabulary "
                f"of {vocab_size}: the data was made for another target"
            )
        counts += torch.bincount(response, minlength=vocab_size)
    return counts


def most_frequent_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids (ties: lower id first), ascending; fewer when
    fewer tokens occur at all. ``counts`` int ``[V]``; returns int64 ``[min(size, seen)]``."""
    if size < 1:
        raise ValueError(f"a draft vocabulary needs at least one token, got size {size}")
    seen = int((counts > 0).sum())
    if seen == 0:
        raise ValueError("no response tokens to count: the data folder's loss masks are empty")
    # A stable sort of -counts keeps equal counts in id order, so the choice is deterministic.
    order = torch.sort(-counts, stable=True).indices
    return order[: min(size, seen)].sort().values
