"""What DFly's sequential correction head costs per step, next to the rest of a step.

A DFlare / DFlash draft reads its B-1 block tokens with ONE head product ``[bs*(B-1), H] x
[H, V]``; a DFly draft corrects slot i by the token picked at slot i-1, so it runs B-1
dependent steps (correction SwiGLU, head product over ``bs`` rows, argmax, embedding lookup).
Side by side in one process, medians of ``--repeats`` (CPU: the engine's bf16 draft head, as
``SpeculativeDecoder`` runs it, and the target's and draft's linears on ``skinny_linear`` as
``dflare generate`` runs them; ``--draft-vocab N`` restricts the head to N rows as a reduced
draft vocabulary does):

* ``one-shot head``: the DFlare / DFlash head of the B-1 slots;
* ``DFly chain``: :meth:`DFlareDraftModel.draft_tokens` with the correction head;
* ``draft pass``: the draft backbone over the block (``draft_block``, ``--context`` tokens);
* ``target verify``: the target's forward over the B block tokens after ``--context`` cached.

The GPU side cannot be timed here; ``--roofline`` prints the bandwidth floor of the chain
(every dependent step re-reads the head and the correction weights) against a target decode
step, for the shapes given (defaults: Qwen3-8B in bf16 on an H100's 3.35 TB/s).

    OMP_NUM_THREADS=2 python benchmarks/bench_dfly_head.py --block-sizes 4 8 16 --batch-sizes 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _roofline(args) -> None:
    h, v, inner, b = args.hidden, args.vocab, args.correction_width or args.hidden, args.bytes
    head = v * h * b
    correction = (2 * (2 * h) * inner + inner * h) * b
    step_ms = (head + correction) / args.bandwidth * 1e3
    target_ms = args.target_params * b / args.bandwidth * 1e3
    print(
        f"\nroofline (bytes / {args.bandwidth / 1e12:.2f} TB/s; H={h}, V={v}, correction width "
        f"{inner}, {b}-byte weights, target {args.target_params / 1e9:.1f}B params):"
    )
    print("| B | one-shot head ms | DFly chain ms | chain / target decode step |")
    print("|---:|---:|---:|---:|")
    for block in args.block_sizes:
        chain = (block - 1) * step_ms
        print(f"| {block} | {head / args.bandwidth * 1e3:.2f} | {chain:.2f} | {chain / target_ms:.2f} |")
    print(
        f"(target decode step floor {target_ms:.2f} ms; at batch size bs every read serves bs "
        "rows, so the chain's share falls as bs grows until the step is compute-bound)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--layers", type=int, default=2, help="draft layers (the bundled draft's)")
    ap.add_argument("--context", type=int, default=192, help="tokens before the block")
    ap.add_argument("--draft-vocab", type=int, default=None, help="head rows (default: all)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--roofline", action="store_true", help="also print the GPU estimate")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--correction-width", type=int, default=None)
    ap.add_argument("--bytes", type=int, default=2)
    ap.add_argument("--target-params", type=float, default=8.2e9)
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    target, _ = load_target(args.target, dtype=dtype, device=device)
    config = DraftConfig.for_target(
        target.config, num_draft_layers=args.layers, fusion="dfly", block_size=max(args.block_sizes)
    )
    draft = DFlareDraftModel(config).eval()
    with torch.no_grad():
        draft.hidden_correction.down_proj.weight.normal_(0.0, 0.02)
    draft = draft.to(device, dtype)
    if device.type == "cpu":
        use_skinny_linear(target, draft)
    embed = target.get_input_embeddings()
    head = target.get_output_embeddings().weight.detach()
    if args.draft_vocab:
        head = head[: args.draft_vocab]
    if device.type == "cpu":
        head = head.to(torch.bfloat16)  # the engine's CPU draft head
    head = head.contiguous()

    def pick(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.to(head.dtype), head).argmax(-1)

    h, kvh, hd = config.hidden_size, config.num_key_value_heads, config.head_dim
    print(
        f"target {args.target}, draft {args.layers} layers (H={h}), head rows {head.shape[0]}, "
        f"context {args.context}, threads {torch.get_num_threads()}, medians of {args.repeats}"
    )
    print("| B | bs | one-shot head ms | DFly chain ms | draft pass ms | target verify ms | "
          "chain - one-shot, % of draft pass + verify |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    vocab = target.config.vocab_size
    for block in args.block_sizes:
        for bs in args.batch_sizes:
            with torch.device(device):
                states = torch.randn(bs, block, h, dtype=dtype)
                anchor = torch.randint(0, vocab, (bs,))
                caches = [
                    torch.randn(bs * args.context, kvh, hd, dtype=dtype)
                    for _ in range(2 * args.layers)
                ]
                slots = torch.arange(bs * args.context).view(bs, args.context)
                lens = torch.full((bs,), args.context)
                positions = args.context + torch.arange(block).expand(bs, block)
                noise = torch.randn(bs, block, h, dtype=dtype)
                ids = torch.randint(0, vocab, (bs, args.context))
                verify_ids = torch.randint(0, vocab, (bs, block))
            with torch.no_grad():
                prefix = DynamicCache()
                target(input_ids=ids, past_key_values=prefix, use_cache=True)

            def verify():
                target(input_ids=verify_ids, past_key_values=prefix, use_cache=True)
                prefix.crop(-block)  # negative: drop the block (transformers 4 and 5)

            with torch.no_grad():
                one_shot = _median_ms(lambda: pick(states[:, 1:]), args.repeats, device)
                chain = _median_ms(
                    lambda: draft.draft_tokens(states, anchor, embed, pick), args.repeats, device
                )
                backbone = _median_ms(
                    lambda: draft.draft_block(
                        noise, positions, caches[::2], caches[1::2], slots, lens
                    ),
                    args.repeats,
                    device,
                )
                verify_ms = _median_ms(verify, args.repeats, device)
            share = 100 * (chain - one_shot) / (backbone + verify_ms)
            print(
                f"| {block} | {bs} | {one_shot:.2f} | {chain:.2f} | {backbone:.2f} | "
                f"{verify_ms:.2f} | {share:.0f}% |",
                flush=True,
            )
    if args.roofline:
        _roofline(args)


if __name__ == "__main__":
    main()
