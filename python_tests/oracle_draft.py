"""Test-only: an engine whose draft knows the target's greedy continuation and errs with a set
probability, to measure what the verify-length policy does with a draft of known quality.

:class:`OracleDecoder` runs the real draft pass (so a step costs what it costs with a real
draft), then replaces its tokens: draft position ``k`` of a request gets the target's greedy
token at that position, or with probability ``error_rate`` (seeded by request and position, so
runs repeat) a wrong one. With block B its tau approaches ``sum_{j<B} (1-error_rate)**j``:
about 2 at 0.5 and 4 at 0.2 for B = 8. Used by ``test_verify_length.py`` and
``benchmarks/bench_verify_length.py``; never part of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dflare_sgl.engine import SpeculativeDecoder


class OracleDecoder(SpeculativeDecoder):
    """:class:`SpeculativeDecoder` with oracle drafts; call :meth:`set_references` before
    each :meth:`generate` with the prompts and their greedy continuations."""


    def __init__(self, *args, error_rate: float, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.error_rate, self.seed = error_rate, seed
        self.prompt_lens: list[int] = []
        self.drafts: list[list[int]] = []

    def set_references(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> None:
        """Request ``i`` of the next ``generate`` is ``prompts[i]``, whose greedy continuation
        is ``continuations[i]``; its drafts are drawn now (errors fixed per position)."""
        vocab = self.target.config.vocab_size
        g = torch.Generator().manual_seed(self.seed)
        self.prompt_lens = [len(p) for p in prompts]
        self.drafts = []
        for ref in continuations:
            truth = torch.tensor(list(ref) + [0] * self.block_size, dtype=torch.int64)
            wrong = torch.rand(truth.shape, generator=g) < self.error_rate
            self.drafts.append(torch.where(wrong, (truth + 1) % vocab, truth).tolist())

    def generate(self, *args, **kwargs):
        """As the engine's; the references set before it are used up by it (a call without
        them, such as a calibration run, drafts with the real draft)."""
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.drafts = []

    def _draft_into(self, block, ids, block_pos, seq_lens):
        super()._draft_into(block, ids, block_pos, seq_lens)  # pay for the real draft pass
        if not self.drafts:
            return
        rows = []
        for i, positions in zip(ids.tolist(), block_pos.tolist()):
            start = positions[1] - self.prompt_lens[i]
            rows.append(self.drafts[i][start : start + len(positions) - 1])
        block[:, 1:] = torch.tensor(rows, dtype=torch.int64, device=block.device)
