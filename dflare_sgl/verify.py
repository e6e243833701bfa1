"""Tree-free block verification: accept lengths, committed tokens and the KV slots to free.

The target scored each request's block ``[x_last, d_1 .. d_{B-1}]`` in one causal pass; row
``k`` of its logits gives the target token ``t_k`` for the position after block position ``k``
(greedy argmax, or Gumbel-max sampling with temperature / top-k / top-p). Then::

    a         = #leading k in 1..B-1 with d_k == t_{k-1}       (accept length)
    committed = [d_1 .. d_a, t_a] == t_0 .. t_a                (accepted drafts + bonus)

cut after the first stop token and to the request's remaining token budget.

Sampling noise is seeded Philox4x32-10 that depends only on (request seed, absolute position,
vocab id), so a sampled token does not depend on batching or on the block size and equals
what target-only sampling with the same noise emits: the committed tokens are exactly the
target's samples, which is how losslessness is tested exactly rather than statistically.

Exact rules (the C++ and CUDA kernels reproduce them token for token; only a one-ulp
difference between the math libraries' double exp/log could change a token, with negligible
probability):
  * greedy (temperature <= 0): ``argmax`` of the row, lowest index on ties;
  * sampling: ``z = logits.float() / T``; top-k keeps ``v`` iff ``#{u: z_u > z_v} < k``
    (tie-inclusive); top-p then keeps ``v`` iff ``M_above(v) < max(ceil(top_p * M), 1)``
    with integer masses ``m_u = floor(exp(z_u - max z) * 2**32)`` (float64 exp; 0 stands for
    ``z_u - max z`` when both are infinite), ``M_above``
    summing ``m_u`` over the kept ``u`` with ``z_u > z_v`` and ``M`` over all kept ``u``: the
    softmax tail-mass test done in exact, order-independent integer sums, so every
    implementation agrees (and the most likely tokens are always kept); then
    ``t = argmax over kept v of (z_v + g_v)``, lowest index on ties, with Gumbel noise
    ``g_v = float32(-log(-log(u_v)))`` computed in float64 from :func:`philox_uniform`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dflare_sgl._ext import has_kernel

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
# Top-p probabilities are fixed point with this unit, so mass sums are exact integers.
MASS_SCALE = 2.0**32
# The reference samples at most this many logits at a time (its int64 Philox temporaries
# are ~10x the logits' size).
_CHUNK_ELEMENTS = 1 << 22


class VerifyOutput(NamedTuple):
    """Result of :func:`verify_block` for ``bs`` requests with block size ``B`` (all int64).

    accept_lens [bs]: accepted draft tokens ``a`` (before stop / budget cuts).
    committed [bs, B]: the ``num_committed`` committed tokens, then -1.
    num_committed [bs]: ``n`` = tokens committed this step (0 .. B).
    new_seq_lens [bs]: ``seq_lens + n``.
    free_slots [bs, B]: ``block_slots[i, k]`` for ``k >= n`` (KV to roll back), else -1.
    """

    accept_lens: torch.Tensor
    committed: torch.Tensor
    num_committed: torch.Tensor
    new_seq_lens: torch.Tensor
    free_slots: torch.Tensor


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for uint32 ``a`` and uint32 words ``b`` in int64.

    The 64-bit product would overflow int64, so ``b`` is split into 16-bit halves.
    """
    p_hi = a * (b >> 16)  # < 2**48
    s = a * (b & 0xFFFF) + ((p_hi & 0xFFFF) << 16)  # low 48 bits of the product, < 2**49
    return (p_hi >> 16) + (s >> 32), s & _MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 block cipher (Salmon et al., SC'11; the Random123 definition).

    Args:
      counter: ``[..., 4]`` int64 holding uint32 words.
      key: ``[..., 2]`` int64 holding uint32 words (broadcast against ``counter``).
    Returns:
      ``[..., 4]`` int64 output words in ``[0, 2**32)``.
    """
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The sampling uniforms ``u [N, vocab_size]`` float64 in ``(0, 1)``.

    ``u[n, v] = ((x >> 9) + 0.5) * 2**-23`` where ``x`` is word ``v & 3`` of Philox4x32-10
    with key ``(seed lo32, seed hi32)`` and counter ``(v >> 2, pos lo32, pos hi32, 0)``.
    Every value is exact in float32 too.

    Args:
      seeds: ``[N]`` int64 per-row Philox keys.
      positions: ``[N]`` int64 absolute position of the token each row's logits follow.
    """
    seeds = seeds.to(torch.int64)[:, None, None]
    pos = positions.to(torch.int64)[:, None, None]
    blocks = torch.arange((vocab_size + 3) // 4, device=seeds.device)[None, :, None]
    counter = torch.cat(
        torch.broadcast_tensors(
            blocks, pos & _MASK32, (pos >> 32) & _MASK32, torch.zeros_like(pos)
        ),
        dim=-1,
    )
    key = torch.cat([seeds & _MASK32, (seeds >> 32) & _MASK32], dim=-1)
    words = philox4x32_10(counter, key).flatten(1)[:, :vocab_size]
    return ((words >> 9).to(torch.float64) + 0.5) * 2.0**-23


def _filter_keep(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tie-inclusive top-k then top-p mask ``[n, V]`` of scaled logits ``z [n, V]`` float32."""
    vocab = z.shape[-1]
    z_sorted, order = z.sort(dim=-1)
    num_le = torch.searchsorted(z_sorted, z, right=True)  # #{u : z_u <= z_v}
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    keep = vocab - num_le < k[:, None]

    z_max = z_sorted[:, -1:].to(torch.float64)
    # A tiny temperature can scale logits to infinity: inf - inf is NaN only at an infinite
    # row max, whose tokens get the max's mass (0 below the max).
    dz = torch.nan_to_num(z.to(torch.float64) - z_max, nan=0.0)
    mass = torch.floor(torch.exp(dz) * MASS_SCALE).to(torch.int64)
    cum = (mass * keep).gather(-1, order).cumsum(-1)  # kept mass of the j+1 smallest z
    total = cum[:, -1:]
    mass_above = total - cum.gather(-1, num_le - 1)
    # ceil makes "mass_above < top_p * total" an integer comparison; clamping at 1 always
    # keeps the most likely tokens (whose mass_above is 0), even for top_p <= 0.
    limit = torch.ceil(top_p[:, None].to(torch.float64) * total).clamp_min(1).to(torch.int64)
    return keep & ((mass_above < limit) | (top_p[:, None] >= 1))


def _gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return (-torch.log(-torch.log(philox_uniform(seeds, positions, vocab_size)))).float()


def sample_rows(
    logits: torch.Tensor,
    positions: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """The target token of each logits row, by the module's exact rules.

    Args:
      logits: ``[N, V]`` float32 / bfloat16 / float16.
      positions: ``[N]`` int64 absolute position of the token each row follows (the noise
        counter).
      temperatures: ``[N]`` float32; ``<= 0`` is greedy.
      top_k: ``[N]`` int64; ``<= 0`` or ``>= V`` is off.
      top_p: ``[N]`` float32; ``>= 1`` is off.
      seeds: ``[N]`` int64 per-request Philox keys.
    Returns:
      ``[N]`` int64 token ids.
    """
    vocab = logits.shape[-1]
    tokens = logits.argmax(dim=-1)
    sampled = (temperatures > 0).nonzero().flatten()
    step = max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, sampled.numel(), step):
        rows = sampled[start : start + step]
        z = logits[rows].float() / temperatures[rows, None].float()
        keep = _filter_keep(z, top_k[rows], top_p[rows])
        scores = z + _gumbel(seeds[rows], positions[rows], vocab)
        tokens[rows] = torch.where(keep, scores, float("-inf")).argmax(dim=-1)
    return tokens


def verify_block_reference(
    draft_tokens: torch.Tensor,
    logits: torch.Tensor,
    seq_lens: torch.Tensor,
    remaining: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    stop_token_ids: torch.Tensor,
    block_slots: torch.Tensor,
) -> VerifyOutput:
    """Plain PyTorch definition of :func:`verify_block` (same arguments)."""
    bs, block = block_slots.shape
    k = torch.arange(block, device=logits.device)

    def per_row(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(block)

    positions = (seq_lens[:, None] + k).flatten()
    t = sample_rows(
        logits, positions, per_row(temperatures), per_row(top_k), per_row(top_p), per_row(seeds)
    ).view(bs, block)
    accept = (draft_tokens == t[:, :-1]).long().cumprod(dim=-1).sum(dim=-1)
    # committed = t_0 .. t_a: cut after the first stop token among them, then to the budget.
    is_stop = (t[:, :, None] == stop_token_ids[:, None, :]).any(dim=-1) & (k <= accept[:, None])
    first_stop = torch.where(is_stop, k, block).amin(dim=-1)
    n = torch.minimum(torch.minimum(accept, first_stop) + 1, remaining.clamp_min(0))
    kept = k < n[:, None]
    return VerifyOutput(
        accept_lens=accept,
        committed=torch.where(kept, t, -1),
        num_committed=n,
        new_seq_lens=seq_lens + n,
        free_slots=torch.where(kept, -1, block_slots),
    )


def _check(x: torch.Tensor, name: str, dtypes: tuple, shape: tuple, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"verify_block: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise ValueError(
            f"verify_block: {name} must be {' or '.join(map(str, dtypes))}, "
            f"got {x.dtype}: convert it with .to()"
        )
    if len(shape) != x.dim() or any(
        s is not None and s != d for s, d in zip(shape, x.shape, strict=True)
    ):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"verify_block: {name} must have shape {want}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(
            f"verify_block: {name} is on {x.device} but logits are on {device}: "
            "move all inputs to one device"
        )


def verify_block(
    draft_tokens: torch.Tensor,
    logits: torch.Tensor,
    seq_lens: torch.Tensor,
    remaining: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    stop_token_ids: torch.Tensor,
    block_slots: torch.Tensor,
) -> VerifyOutput:
    """Verify one drafted block per request (bs requests, block size B, vocab V).

    Runs ``torch.ops.dflare.verify_block`` when the extension has a kernel for the logits'
    device (on CUDA: one launch, no host sync, CUDA-graph capturable), else the reference.

    Args:
      draft_tokens: ``[bs, B-1]`` int64 drafts ``d_1 .. d_{B-1}``.
      logits: ``[bs*B, V]`` float32 / bfloat16 / float16, unit stride along V; row
        ``i*B + k`` is the target's prediction after block position ``k`` of request ``i``.
      seq_lens: ``[bs]`` int64 absolute position of ``x_last`` (block position 0).
      remaining: ``[bs]`` int64 tokens each request may still commit (``<= 0``: none).
      temperatures: ``[bs]`` float32, ``<= 0`` is greedy.
      top_k: ``[bs]`` int64, ``<= 0`` or ``>= V`` is off.
      top_p: ``[bs]`` float32, ``>= 1`` is off.
      seeds: ``[bs]`` int64 per-request Philox keys.
      stop_token_ids: ``[bs, S]`` int64, padded with -1 (``S`` may be 0).
      block_slots: ``[bs, B]`` int64 KV-cache slots of block positions ``0 .. B-1``.
    Returns:
      :class:`VerifyOutput`.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"verify_block: logits must be a torch.Tensor, got {type(logits).__name__}"
        )
    dev = logits.device
    i64, f32 = (torch.int64,), (torch.float32,)
    _check(block_slots, "block_slots", i64, (None, None), dev)
    bs, block = block_slots.shape
    if block < 1:
        raise ValueError("verify_block: block_slots must have at least one column (B >= 1)")
    _check(
        logits, "logits", (torch.float32, torch.bfloat16, torch.float16), (bs * block, None), dev
    )
    if logits.shape[1] < 1 or logits.stride(1) != 1:
        raise ValueError(
            "verify_block: logits needs a non-empty vocab dim with unit stride: "
            "pass logits.contiguous()"
        )
    _check(draft_tokens, "draft_tokens", i64, (bs, block - 1), dev)
    for name, x, dtypes in [
        ("seq_lens", seq_lens, i64),
        ("remaining", remaining, i64),
        ("temperatures", temperatures, f32),
        ("top_k", top_k, i64),
        ("top_p", top_p, f32),
        ("seeds", seeds, i64),
    ]:
        _check(x, name, dtypes, (bs,), dev)
    _check(stop_token_ids, "stop_token_ids", i64, (bs, None), dev)

    args = (
        draft_tokens,
        logits,
        seq_lens,
        remaining,
        temperatures,
        top_k,
        top_p,
        seeds,
        stop_token_ids,
        block_slots,
    )
    if has_kernel("verify_block", dev):
        return VerifyOutput(*torch.ops.dflare.verify_block(*args))
    return verify_block_reference(*args)
