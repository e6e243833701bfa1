"""The alignment losses against direct hand computations, and their gradients (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from dflare_sgl.training.losses import (
    AlignmentLoss,
    ChainLoss,
    FirstErrorFocalLoss,
    GammaSchedule,
    PositionWeightedCE,
    SoftTargetKL,
    soft_target_kl,
    token_stats,
)

V, K = 7, 5  # vocab, positions per block (B - 1)
GAMMA = 3.0
# Per block: which positions the draft gets right, and how many positions are valid.
CASES = {
    "no error": ([1, 1, 1, 1, 1], 5),
    "error at first": ([0, 1, 1, 0, 1], 5),
    "error in middle": ([1, 1, 0, 1, 0], 5),
    "padded, error only past the end": ([1, 1, 0, 0, 0], 2),
    "padded, error inside": ([1, 0, 1, 1, 1], 3),
    "all padding": ([0, 0, 0, 0, 0], 0),
}


def _blocks(dtype=torch.float64):
    """logits [N, K, V], labels [N, K], valid [N, K] with the argmax right/wrong as CASES say."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), K, V, generator=g, dtype=dtype)
    labels = torch.randint(V, (len(CASES), K), generator=g)
    valid = torch.zeros(len(CASES), K, dtype=torch.bool)
    for n, (right, num_valid) in enumerate(CASES.values()):
        valid[n, :num_valid] = True
        for k, ok in enumerate(right):
            row = logits[n, k]
            row[labels[n, k]] = row.max() + 1.0 if ok else row.min() - 1.0
    return logits, labels, valid


def _hand(logits, labels, valid, in_vocab=None):
    """Each term computed position by position with math, straight from DESIGN.md s.4. A label
    out of the draft's vocabulary (``in_vocab`` False) is a wrong guess with no CE to train,
    p = 0, and, when it is a block's first error, nothing for the focal term."""
    w = [math.exp(-k / GAMMA) for k in range(K)]
    num = den = 0.0
    fe, n_err, chain, n_chain = 0.0, 0, 0.0, 0
    for n in range(logits.shape[0]):
        ces, oks, ps = [], [], []
        for k in range(K):
            row = logits[n, k].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            known = in_vocab is None or bool(in_vocab[n, k])
            ces.append(log_z - row[labels[n, k]])
            ps.append(math.exp(-ces[-1]) if known else 0.0)
            oks.append(known and max(range(V), key=row.__getitem__) == labels[n, k])
        ks = [k for k in range(K) if valid[n, k]]
        for k in ks:
            if in_vocab is None or in_vocab[n, k]:
                num += w[k] * ces[k]
                den += w[k]
        wrong = [k for k in ks if not oks[k]]
        if wrong and (in_vocab is None or in_vocab[n, wrong[0]]):
            fe += w[wrong[0]] * ces[wrong[0]]
            n_err += 1
        if ks:
            chain += sum(math.prod(ps[: k + 1]) for k in ks) / len(ks)
            n_chain += 1
    nan = math.nan
    return num / den if den else nan, fe / max(n_err, 1), -chain / n_chain if n_chain else nan


def test_each_term_matches_a_hand_computation():
    logits, labels, valid = _blocks()
    ce, correct = token_stats(logits, labels)
    pos, fe, chain = _hand(logits, labels, valid)
    torch.testing.assert_close(PositionWeightedCE()(ce, valid, GAMMA).item(), pos)
    torch.testing.assert_close(FirstErrorFocalLoss()(ce, correct, valid, GAMMA).item(), fe)
    torch.testing.assert_close(ChainLoss()(ce, valid).item(), chain)
    terms = AlignmentLoss(focal_weight=0.3, chain_weight=0.5)(ce, correct, valid, GAMMA)
    torch.testing.assert_close(terms.total.item(), pos + 0.3 * fe + 0.5 * chain)


def _out_of_vocab(valid):
    """Labels a reduced draft vocabulary lacks: the first error of 'no error' (a right guess
    made wrong), the first error of 'error at first' and of 'padded, error inside', and one
    past the first error of 'error in middle'."""
    in_vocab = torch.ones_like(valid)
    for n, k in [(0, 2), (1, 0), (2, 3), (4, 1)]:
        in_vocab[n, k] = False
    return in_vocab


def test_labels_outside_the_draft_vocabulary():
    """A draft trained over a reduced vocabulary sees label -1 where the target's token is not
    in it (objective.draft_block_stats): CE 0, never correct, and the terms as _hand says."""
    logits, labels, valid = _blocks()
    in_vocab = _out_of_vocab(valid)
    ce, correct = token_stats(logits, torch.where(in_vocab, labels, -1))
    assert (ce[~in_vocab] == 0).all() and not correct[~in_vocab].any()
    pos, fe, chain = _hand(logits, labels, valid, in_vocab)
    torch.testing.assert_close(PositionWeightedCE()(ce, valid, GAMMA, in_vocab).item(), pos)
    got_fe = FirstErrorFocalLoss()(ce, correct, valid, GAMMA, in_vocab).item()
    torch.testing.assert_close(got_fe, fe)
    torch.testing.assert_close(ChainLoss()(ce, valid, in_vocab).item(), chain)
    terms = AlignmentLoss(0.3, 0.5)(ce, correct, valid, GAMMA, in_vocab)
    torch.testing.assert_close(terms.total.item(), pos + 0.3 * fe + 0.5 * chain)
    # Every label in the vocabulary: the same as no vocabulary at all.
    everything = torch.ones_like(valid)
    ce, correct = token_stats(logits, labels)
    plain = AlignmentLoss(0.3, 0.5)(ce, correct, valid, GAMMA)
    assert AlignmentLoss(0.3, 0.5)(ce, correct, valid, GAMMA, everything).total == plain.total


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_alone(case):
    """Every block shape on its own (no other block to hide a mistake in the averaging)."""
    logits, labels, valid = _blocks()
    n = list(CASES).index(case)
    sel = slice(n, n + 1)
    ce, correct = token_stats(logits[sel], labels[sel])
    pos, fe, chain = _hand(logits[sel], labels[sel], valid[sel])
    if valid[sel].any():
        torch.testing.assert_close(PositionWeightedCE()(ce, valid[sel], GAMMA).item(), pos)
    else:  # nothing to learn from: zero, not NaN
        assert PositionWeightedCE()(ce, valid[sel], GAMMA).item() == 0.0
    torch.testing.assert_close(FirstErrorFocalLoss()(ce, correct, valid[sel], GAMMA).item(), fe)
    if valid[sel].any():
        torch.testing.assert_close(ChainLoss()(ce, valid[sel]).item(), chain)
    else:
        assert ChainLoss()(ce, valid[sel]).item() == 0.0
    if case in ("no error", "padded, error only past the end"):
        assert FirstErrorFocalLoss()(ce, correct, valid[sel], GAMMA).item() == 0.0


def test_plain_ce_and_switches():
    logits, labels, valid = _blocks()
    ce, correct = token_stats(logits, labels)
    torch.testing.assert_close(PositionWeightedCE()(ce, valid, None), ce[valid].mean())
    terms = AlignmentLoss(focal_weight=0.0, chain_weight=0.0)(ce, correct, valid, None)
    torch.testing.assert_close(terms.total, ce[valid].mean())
    assert terms.first_error is None and terms.chain is None


def test_gamma_schedule():
    assert GammaSchedule.parse("7").at(0, 10) == GammaSchedule.parse("7").at(9, 10) == 7.0
    ramp = GammaSchedule.parse("4.5:10.5")
    assert (ramp.at(0, 11), ramp.at(5, 11), ramp.at(10, 11)) == (4.5, 7.5, 10.5)
    assert GammaSchedule(None, None).at(3, 10) is None
    with pytest.raises(ValueError, match="4.5:10.5"):
        GammaSchedule.parse("fast")


@pytest.mark.parametrize("reduced_vocab", [False, True])
@pytest.mark.parametrize("term", ["position", "first_error", "chain"])
def test_gradcheck_float64(term, reduced_vocab):
    _, labels, valid = _blocks()
    logits, _, _ = _blocks()
    logits.requires_grad_(True)
    in_vocab = _out_of_vocab(valid) if reduced_vocab else None
    if reduced_vocab:
        labels = torch.where(in_vocab, labels, -1)
    # The first-error position is read once from the fixed logits (argmax is piecewise
    # constant; finite differences never cross a tie here).
    _, correct = token_stats(logits.detach(), labels)

    def f(x):
        ce, _ = token_stats(x, labels)
        if term == "position":
            return PositionWeightedCE()(ce, valid, GAMMA, in_vocab)
        if term == "first_error":
            return FirstErrorFocalLoss()(ce, correct, valid, GAMMA, in_vocab)
        return ChainLoss()(ce, valid, in_vocab)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def _soft_targets(rows: int, top_k: int, dtype=torch.float64):
    """Target log-probabilities over V (a full distribution), its top-k ids and values."""
    g = torch.Generator().manual_seed(3)
    target_logprobs = torch.randn(rows, V, generator=g, dtype=dtype).mul(2).log_softmax(-1)
    values, ids = target_logprobs.topk(top_k, dim=-1)
    return target_logprobs, ids, values


def _hand_kl(draft_logits, target_logprobs, ids):
    """KL over the outcomes {each listed id the draft has (id >= 0)} + {anything else},
    position by position with math."""
    out = []
    for r in range(draft_logits.shape[0]):
        q = [math.exp(x) for x in draft_logits[r].tolist()]
        q = [x / sum(q) for x in q]
        p = [math.exp(x) for x in target_logprobs[r].tolist()]
        listed = [int(i) for i in ids[r].tolist() if i >= 0]
        kl = sum(p[i] * math.log(p[i] / q[i]) for i in listed)
        p_other, q_other = 1 - sum(p[i] for i in listed), 1 - sum(q[i] for i in listed)
        out.append(kl + (p_other * math.log(p_other / q_other) if p_other > 0 else 0.0))
    return torch.tensor(out, dtype=torch.float64)


def test_soft_target_kl_matches_a_hand_computation():
    """The top-k KL on hand-computed cases: the target's full distribution seen through its
    top-3 (the rest one outcome); ids the draft's head lacks (-1) join "anything else"; the
    whole vocabulary listed is the full KL; a draft equal to the target on the listed tokens and
    on the rest's total gives 0."""
    draft = torch.randn(6, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target_logprobs, ids, values = _soft_targets(6, 3)
    got = soft_target_kl(draft, ids, values)
    torch.testing.assert_close(got, _hand_kl(draft, target_logprobs, ids))
    assert (got > 0).all()
    lacking = ids.clone()
    lacking[:, 1] = -1
    torch.testing.assert_close(
        soft_target_kl(draft, lacking, values), _hand_kl(draft, target_logprobs, lacking)
    )
    _, all_ids, all_values = _soft_targets(6, V)
    full = torch.nn.functional.kl_div(
        draft.log_softmax(-1), target_logprobs, log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(soft_target_kl(draft, all_ids, all_values), full)
    # Equal on the top-3 and on the rest's total mass (spread differently): zero.
    matched = target_logprobs.clone()
    rest = torch.ones_like(matched, dtype=torch.bool).scatter_(-1, ids, False)
    other = torch.logsumexp(matched.masked_fill(~rest, -math.inf), -1, keepdim=True)
    matched = torch.where(rest, other - math.log(V - 3), matched)
    zero = soft_target_kl(matched, ids, values)
    torch.testing.assert_close(zero, torch.zeros_like(zero), atol=1e-12, rtol=0)


def test_soft_target_kl_term():
    """SoftTargetKL: the position-weighted mean over valid positions; in AlignmentLoss with its
    weight; asked for without soft targets, a clear error."""
    g = torch.Generator().manual_seed(5)
    kl = torch.rand(4, K, generator=g, dtype=torch.float64)
    valid = torch.rand(4, K, generator=g) > 0.3
    w = torch.tensor([math.exp(-k / GAMMA) for k in range(K)], dtype=torch.float64)
    expected = (kl * w * valid).sum() / (w * valid).sum()
    torch.testing.assert_close(SoftTargetKL()(kl, valid, GAMMA), expected)
    logits, labels, valid = _blocks()
    ce, correct = token_stats(logits, labels)
    kl = torch.rand(valid.shape, generator=g, dtype=torch.float64) * valid
    off = AlignmentLoss(0.3, 0.5)(ce, correct, valid, GAMMA)
    on = AlignmentLoss(0.3, 0.5, kl_weight=0.7)(ce, correct, valid, GAMMA, kl=kl)
    assert off.soft_target_kl is None
    torch.testing.assert_close(on.soft_target_kl, SoftTargetKL()(kl, valid, GAMMA).item())
    torch.testing.assert_close(on.total, off.total + 0.7 * SoftTargetKL()(kl, valid, GAMMA))
    with pytest.raises(ValueError, match="soft targets"):
        AlignmentLoss(kl_weight=1.0)(ce, correct, valid, GAMMA)


@pytest.mark.parametrize("lacking", [False, True])
def test_soft_target_kl_gradcheck_float64(lacking):
    """Gradients of the top-k KL, also with listed ids the head lacks and with a head no larger
    than the list (no "other" outcome: the row leaves the tail out, no NaN)."""
    _, ids, values = _soft_targets(5, 3)
    if lacking:
        ids = ids.clone()
        ids[:, 0] = -1
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: soft_target_kl(x, ids, values), (logits,))
    small = logits[:, :3].detach().clone().requires_grad_(True)  # head of 3 tokens, all listed
    every = torch.arange(3).expand(5, 3)
    assert torch.autograd.gradcheck(lambda x: soft_target_kl(x, every, values), (small,))
    soft_target_kl(small, every, values).sum().backward()
    assert torch.isfinite(small.grad).all()
