"""Training-data throughput: labelled tokens per second of ``dflare gen-data``'s ways to label.

Side by side in one process, on the same ShareGPT conversations (evaluation prompts excluded,
as gen-data selects them), with the gen-data code itself:

* ``regenerate``: the target samples responses to the first user turns (``--responses
  target``: batched HF ``generate``, left-padded, ``--max-new-tokens``); a label is a response
  token. With ``--sglang`` also ``--backend sglang``: an SGLang server of the target (same
  thread count) given all prompts in one request, timed in a phase of its own after the others
  (started outside the timing, and stopped before anything else runs: its idle scheduler
  polls on a core).
* ``labelled``: one prefill over the whole conversation (``--responses labelled``: every
  assistant turn, cut at ``--max-len``, right-padded batches, top-k log-probabilities kept); a
  label is an assistant-turn token (with the target's greedy token and top-k there), at each of
  ``--label-batch-sizes`` (batches of similar lengths, as gen-data sorts a shard).

Medians of ``--repeats`` passes over the same inputs, interleaved. Threads as
``OMP_NUM_THREADS`` sets them (state it with the numbers)::

    OMP_NUM_THREADS=2 python benchmarks/bench_gen_data.py --prompts 64 --label-batch-sizes 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids
from dflare_sgl.target import load_target
from dflare_sgl.training import data
from dflare_sgl.training.generate import GenDataConfig, sample_responses
from dflare_sgl.training.sglang_responses import sglang_responses, sglang_server
from dflare_sgl.training.target_labels import conversation_tokens, label_batch


def _batches(items: list, size: int, length) -> list[list]:
    """Batches of similar ``length(item)``, as gen-data makes them."""
    items = sorted(items, key=length)
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=16, help="conversations (default: 16)")
    p.add_argument("--batch-size", type=int, default=16, help="regeneration batch")
    p.add_argument("--label-batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sglang", action="store_true", help="also regenerate with SGLang")
    args = p.parse_args()

    model, tokenizer = load_target(args.target, dtype=getattr(torch, args.dtype))
    stops = stop_token_ids(model, tokenizer)
    chosen = []
    for prompt in data.iter_training_prompts(whole_conversations=True):
        tokens = conversation_tokens(tokenizer, prompt.conversation, stops, args.max_len)
        if tokens is not None:
            chosen.append((prompt, tokens))
        if len(chosen) == args.prompts:
            break
    prompts = encode_prompts(tokenizer, [p.text for p, _ in chosen], chat=True)
    conversations = [tokens for _, tokens in chosen]
    cfg = GenDataConfig(
        target=args.target, out="", max_new_tokens=args.max_new_tokens, temperature=0.7
    )

    def regenerate() -> int:
        torch.manual_seed(0)
        return sum(
            len(r)
            for batch in _batches(prompts, args.batch_size, len)
            for r in sample_responses(model, tokenizer, batch, cfg, stops)
        )

    def labelled(batch_size: int):
        def run() -> int:
            for batch in _batches(conversations, batch_size, lambda c: len(c[0])):
                label_batch(model, batch, args.top_k)
            return sum(sum(mask) for _, mask in conversations)

        return run

    ways = {f"regenerate (HF generate, batch {args.batch_size})": regenerate}
    rates: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for size in args.label_batch_sizes:
        ways[f"labelled (prefill, batch {size})"] = labelled(size)

    def timed(phase: dict) -> None:
        for _ in range(args.repeats):
            for name, run in phase.items():
                t0 = time.perf_counter()
                tokens[name] = run()
                rates.setdefault(name, []).append(tokens[name] / (time.perf_counter() - t0))

    with torch.inference_mode():
        timed(ways)
    if args.sglang:
        kv_tokens = len(prompts) * (max(map(len, prompts)) + args.max_new_tokens)
        with sglang_server("sglang", args.target, "cpu", args.dtype, 0, kv_tokens) as url:
            timed(
                {
                    "regenerate (SGLang server, one request)": lambda: sum(
                        map(len, sglang_responses(url, prompts, args.max_new_tokens, 0.7, stops))
                    )
                }
            )
    context = sum(len(ids) for ids, _ in conversations)
    print(
        f"{args.target} {args.dtype}, {torch.get_num_threads()} threads, {len(chosen)} "
        f"conversations ({context} tokens, cut at {args.max_len}), top-k {args.top_k}, "
        f"regeneration {args.max_new_tokens} new tokens at T 0.7; median of {args.repeats}\n"
    )
    base = statistics.median(next(iter(rates.values())))
    print("| way | labelled tokens | labelled tokens/s | vs regenerate |\n|---|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {tokens[name]} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
