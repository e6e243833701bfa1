"""What one decoding request asks for (:class:`SamplingParams`) and what it gets back
(:class:`GenerationResult`, with its speculative-decoding statistics), and the statistics
over several requests that the CLI, the demo and the benchmarks print.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature <= 0`` is greedy; ``top_k <= 0`` and
    ``top_p >= 1`` switch those filters off. Generation ends after ``max_new_tokens`` tokens
    or on the first of ``stop_token_ids`` (which is kept in the output)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """What one request produced, with its speculative-decoding statistics."""

    tokens: list[int] = field(default_factory=list)
    # Tokens committed by each draft+verify step (accepted drafts + the bonus token): the
    # per-step acceptance length tau. The first token comes from prefill, not a step.
    accept_lengths: list[int] = field(default_factory=list)
    # Tokens verified by each step (1 = plain decoding, no draft).
    verify_lengths: list[int] = field(default_factory=list)
    num_drafted: int = 0
    num_accepted: int = 0
    wall_time_s: float = 0.0
    finish_reason: str = "length"

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward in the decode phase."""
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_time_s if self.wall_time_s > 0 else 0.0


def pooled_tau(results: Sequence[GenerationResult]) -> float:
    """Tau over all the decode steps of several requests (each step weighs the same)."""
    steps = sum(len(r.accept_lengths) for r in results)
    return sum(sum(r.accept_lengths) for r in results) / max(steps, 1)


def verify_length_counts(results: Sequence[GenerationResult]) -> dict[int, int]:
    """Steps per verify length over several requests' decode steps, by increasing length."""
    counts: dict[int, int] = {}
    for r in results:
        for n in r.verify_lengths:
            counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))
