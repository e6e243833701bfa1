"""Training throughput: sequences/s of ``dflare train``'s step at given draft shapes.

Runs the trainer's own step (target hidden states online, all blocks in one draft forward,
the alignment loss, backward, AdamW) on batches of a ``dflare gen-data`` folder, and times the
target pass and the frozen lm_head (forward + backward) on their own for a breakdown.
``--draft-vocab-size`` trains over the data's N most frequent tokens only (``dflare train
--draft-vocab-size``; 0 = every token), the head over those N rows.

    OMP_NUM_THREADS=2 python benchmarks/bench_training.py --data /tmp/gd --layers 2 3 \
        --block-size 8 16 --precision fp32 bf16 --draft-vocab-size 0 8192
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.target import load_target
from dflare_sgl.training.data import load_sequences
from dflare_sgl.training.draft_vocab import most_frequent_tokens, response_token_counts
from dflare_sgl.training.loader import DataOrder, collate
from dflare_sgl.training.losses import AlignmentLoss
from dflare_sgl.training.objective import autocast, draft_block_stats, target_context
from dflare_sgl.training.trainer import autocast_dtype


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_shape(args, target, batches, precision: str, layers: int, block: int, vocab: int):
    """(sequences/s, step s, target pass s, lm_head fwd+bwd s, head rows) of one draft shape
    (a vocabulary of N keeps fewer rows when the data has fewer distinct tokens)."""
    device = batches[0].input_ids.device
    dtype = autocast_dtype(device, precision)
    config = DraftConfig.for_target(target.config, num_draft_layers=layers, block_size=block)
    draft = DFlareDraftModel(config)
    if vocab:
        counts = response_token_counts(args.data, config.vocab_size)
        draft.set_draft_vocab(most_frequent_tokens(counts, vocab))
    draft = draft.to(device)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4)
    loss_fn = AlignmentLoss()
    step = itertools.count()

    def train_step() -> None:
        i = next(step)
        stats = draft_block_stats(
            draft,
            target,
            batches[i % len(batches)],
            args.anchors,
            block,
            config.mask_token_id,
            config.target_layer_ids,
            torch.Generator().manual_seed(i),
            dtype,
        )
        loss_fn(stats.ce, stats.correct, stats.valid, 7.0, stats.in_vocab).total.backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()  # warm-up
    step_s = _timed(train_step, args.steps)
    # The target pass alone, on the batches the timed steps used.
    used = itertools.cycle(batches[1 : 1 + args.steps])
    target_s = _timed(
        lambda: target_context(target, next(used), config.target_layer_ids, dtype), args.steps
    )
    rows = args.batch_size * args.anchors * (block - 1)
    hidden = torch.randn(rows, config.hidden_size, device=device, requires_grad=True)
    ids = draft.draft_vocab_ids
    labels = torch.randint(config.vocab_size if ids is None else ids.numel(), (rows,), device=device)
    weight = target.get_output_embeddings().weight

    def head() -> None:  # as draft_block_stats applies it
        with autocast(device, dtype):
            logits = F.linear(hidden, weight if ids is None else weight[ids])
        F.cross_entropy(logits.float(), labels).backward()

    head_rows = config.vocab_size if ids is None else ids.numel()
    return args.batch_size / step_s, step_s, target_s, _timed(head, 2), head_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--data", required=True, help="a dflare gen-data folder")
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--block-size", type=int, nargs="+", default=[16])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per shape (after 1 warm-up)")
    ap.add_argument(
        "--draft-vocab-size", type=int, nargs="+", default=[0], help="0 = every token (default)"
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    sequences = load_sequences(Path(args.data))
    order = DataOrder(len(sequences), args.batch_size, seed=0)
    batches = [collate([sequences[i] for i in order.indices(s)]).to(device) for s in range(8)]
    tokens = statistics.mean(int(b.attention_mask.sum()) for b in batches) / args.batch_size
    print(
        f"threads {torch.get_num_threads()} | batch {args.batch_size} x ~{tokens:.0f} tokens | "
        f"{args.anchors} anchors per sequence"
    )
    print("precision layers B head rows | seq/s | step ms | target pass ms | lm_head fwd+bwd ms")
    shapes = itertools.product(
        args.precision, args.layers, args.block_size, args.draft_vocab_size
    )
    for precision, layers, block, vocab in shapes:
        # As the trainer does: the frozen target is stored in the compute dtype.
        target, _ = load_target(
            args.target, dtype=autocast_dtype(device, precision) or torch.float32, device=device
        )
        target.requires_grad_(False)
        seq_s, step_s, target_s, head_s, rows = _bench_shape(
            args, target, batches, precision, layers, block, vocab
        )
        print(
            f"{precision:>9} {layers:>6} {block:>2} {rows:>9} | {seq_s:5.2f} | "
            f"{step_s * 1e3:7.0f} | "
            f"{target_s * 1e3:14.0f} | {head_s * 1e3:8.0f}"
        )


if __name__ == "__main__":
    main()
