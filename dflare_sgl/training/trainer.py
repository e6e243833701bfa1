"""``dflare train``: train a DFlare / DFlash draft on regenerated data, on one or many processes.

Per step and rank: a batch of sequences (:mod:`loader`), the frozen target's hidden states
for them (online), every block of every sequence in one draft forward (:mod:`objective`), the
alignment loss (:mod:`losses`), AdamW with cosine-after-warmup learning rate, grad clip 1.0.
Weights stay fp32 (the optimizer's master copy); the forward runs under bf16 autocast where
the device supports it. Under ``torchrun`` the draft is FSDP2-sharded (:mod:`distributed`).

Outputs in ``out``: ``config.json`` + ``model.safetensors`` (the trained draft, published
format), ``checkpoints/step-N/`` (:mod:`checkpoint`), ``metrics.jsonl`` (and TensorBoard events
under ``tensorboard/`` when the package is installed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.engine import SamplingParams, SpeculativeDecoder, pooled_tau
from dflare_sgl.target import load_target
from dflare_sgl.training import checkpoint, data
from dflare_sgl.training.context_cache import TargetContextCache
from dflare_sgl.training.distributed import Dist, init_distributed, shard_model, shutdown
from dflare_sgl.training.draft_vocab import most_frequent_tokens, response_token_counts
from dflare_sgl.training.initialize import init_from_draft, init_from_target
from dflare_sgl.training.loader import DataOrder, collate
from dflare_sgl.training.losses import AlignmentLoss, GammaSchedule, default_gamma
from dflare_sgl.training.objective import BlockStats, draft_block_stats


@dataclass
class TrainConfig:
    target: str
    data: str
    out: str
    fusion: str = "layerwise"
    layers: int = 2
    captured_layers: int | None = None
    block_size: int = 16
    steps: int | None = None
    epochs: float | None = None
    lr: float = 6e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    batch_size: int = 4
    anchors: int = 32
    gamma: str | None = None  # "7" or "4.5:10.5"; None = default_gamma(block_size)
    position_weighting: bool = True
    focal_weight: float = 0.3
    chain_weight: float = 0.1
    kl_weight: float = 0.0  # soft-target KL (target-labelled data with top-k)
    max_seq_len: int = 2048
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_prompts: int = 4
    eval_max_new_tokens: int = 48
    stop_after_steps: int | None = None
    cache_target_hidden: bool = False
    init_from_target: bool = False
    init_draft: str | None = None  # a saved draft folder to start from
    draft_vocab_size: int | None = None  # train (and save) over the N most frequent tokens


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 where the device has fast bf16 (CUDA with bf16, a CPU with avx512_bf16/AMX)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError(f"--precision bf16: this {device.type} has no fast bf16; use fp32")
    return torch.bfloat16 if supported else None


def warmup_cosine(warmup: int, total: int):
    """Learning-rate factor: linear 0 -> 1 over ``warmup`` steps, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def held_out_tau(
    target, config: DraftConfig, state, prompts: list[list[int]], max_new: int
) -> float:
    """Real tau of the draft with weights ``state``: greedy speculative decoding of ``prompts``."""
    with torch.device("meta"):
        draft = DFlareDraftModel(config)
    draft.load_state_dict(state, assign=True)
    target_weight = next(target.parameters())
    draft = draft.to(target_weight.device, target_weight.dtype)
    # At the training block size: the draft's quality, not the CPU engine's default block.
    results = SpeculativeDecoder(target, draft, block_size=config.block_size).generate(
        prompts, SamplingParams(max_new_tokens=max_new)
    )
    return pooled_tau(results)


def _mean_over_ranks(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(values)
        values = values / d.world_size
    return values


class _MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, start_step: int) -> None:
        self.file = None
        if enabled:
            # Lines past the step this run starts from belong to a run that was cut off
            # after its last checkpoint: this run writes those steps again.
            path = out / "metrics.jsonl"
            kept = [
                line
                for line in (path.read_text().splitlines() if path.is_file() else [])
                if json.loads(line)["step"] <= start_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, step: int, metrics: dict[str, float | None]) -> None:
        """One line per step; None (a switched-off term) is written as null."""
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _prepare_data(cfg: TrainConfig, target, tokenizer):
    """(training sequences, held-out prompts): checked against the target and block size."""
    folder = Path(cfg.data)
    meta = data.read_metadata(folder)
    data.check_target(meta, target.config, tokenizer, folder)
    sequences = [s.cut(cfg.max_seq_len) for s in data.load_sequences(folder)]
    if cfg.kl_weight and sequences[0].topk_ids is None:
        raise ValueError(
            f"--kl-weight {cfg.kl_weight}: the data in {folder} has no top-k soft targets; make "
            "it with `dflare gen-data --responses labelled --top-k K`, or pass --kl-weight 0"
        )
    longest = max(int(s.loss_mask.sum()) for s in sequences)
    if cfg.block_size > longest:
        raise ValueError(
            f"--block-size {cfg.block_size} is bigger than every sequence's response (the longest "
            f"has {longest} tokens): lower --block-size or regenerate with a larger "
            "--max-new-tokens"
        )
    sequences = [s for s in sequences if int(s.loss_mask.sum()) >= 2]
    held_out: list[list[int]] = []
    if cfg.eval_every > 0:
        if len(sequences) < 2 * cfg.eval_prompts:
            raise ValueError(
                f"--eval-every needs {cfg.eval_prompts} held-out sequences and as many for "
                f"training, the data has {len(sequences)}: generate more or pass --eval-every 0"
            )
        held_out = [s.prompt().tolist() for s in sequences[-cfg.eval_prompts :]]
        sequences = sequences[: -cfg.eval_prompts]
    return sequences, held_out


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns ``cfg.out``, which then holds the trained draft."""
    d = init_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        shutdown(d)


def _train(cfg: TrainConfig, d: Dist) -> Path:
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    dtype = autocast_dtype(d.device, cfg.precision)
    # The frozen target is stored in the compute dtype: no per-step casts of its weights.
    target, tokenizer = load_target(cfg.target, dtype=dtype or torch.float32, device=d.device)
    target.requires_grad_(False)
    sequences, held_out = _prepare_data(cfg, target, tokenizer)
    config = DraftConfig.for_target(
        target.config,
        num_draft_layers=cfg.layers,
        fusion=cfg.fusion,
        block_size=cfg.block_size,
        num_captured_layers=cfg.captured_layers,
    )
    resume_from = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: {out} has no checkpoints/step-* folder to resume from")
    draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(cfg.seed))
    # A resumed run overwrites these with its checkpoint.
    if cfg.init_draft is not None:
        init_from_draft(draft, cfg.init_draft)
    elif cfg.init_from_target:
        init_from_target(draft, target)
    if cfg.draft_vocab_size is not None:
        counts = response_token_counts(cfg.data, config.vocab_size)
        draft.set_draft_vocab(most_frequent_tokens(counts, cfg.draft_vocab_size))
    model = shard_model(draft.to(d.device), d)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    order = DataOrder(len(sequences), cfg.batch_size, cfg.seed, d.rank, d.world_size)
    total = cfg.steps or max(1, round((cfg.epochs or 1.0) * order.steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    step = 0
    if resume_from is not None:
        step = checkpoint.load_checkpoint(resume_from, model, optimizer, scheduler, config)
    end = total if cfg.stop_after_steps is None else min(total, step + cfg.stop_after_steps)

    gamma = (
        GammaSchedule(None, None)
        if not cfg.position_weighting
        else GammaSchedule.parse(cfg.gamma or str(default_gamma(cfg.block_size)))
    )
    loss_fn = AlignmentLoss(cfg.focal_weight, cfg.chain_weight, cfg.kl_weight)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    cache = TargetContextCache(config.target_layer_ids, dtype) if cfg.cache_target_hidden else None
    log = _MetricsLog(out, d.is_main, step)
    bar = tqdm(total=total, initial=step, unit="step", desc="train", disable=not d.is_main)
    model.train()
    while step < end:
        t0 = time.perf_counter()
        indices = order.indices(step)
        batch = collate([sequences[i] for i in indices], cfg.max_seq_len).to(d.device)
        # Anchors depend only on (seed, step, rank): a resumed run draws the same ones.
        anchor_rng = torch.Generator().manual_seed((cfg.seed << 40) ^ (step << 12) ^ d.rank)
        stats: BlockStats = draft_block_stats(
            model,
            target,
            batch,
            cfg.anchors,
            cfg.block_size,
            config.mask_token_id,
            config.target_layer_ids,
            anchor_rng,
            dtype,
            context=None if cache is None else cache.context(target, batch, indices),
            soft_targets=cfg.kl_weight > 0,
        )
        g = gamma.at(step, total)
        terms = loss_fn(stats.ce, stats.correct, stats.valid, g, stats.in_vocab, stats.kl)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        reduced = _mean_over_ranks(
            torch.stack(
                [terms.total.detach(), stats.first_position_accuracy(), stats.estimated_tau()]
            ).float(),
            d,
        ).tolist()
        metrics = {
            "loss": reduced[0],
            "acc_first": reduced[1],
            "tau_est": reduced[2],
            "position_ce": terms.position_ce,
            "first_error": terms.first_error,
            "chain": terms.chain,
            "soft_target_kl": terms.soft_target_kl,
            "lr": scheduler.get_last_lr()[0],
            "gamma": g,
            "grad_norm": float(
                grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            ),
            "seq_per_s": cfg.batch_size * d.world_size / (time.perf_counter() - t0),
        }
        if held_out and step % cfg.eval_every == 0:
            state = checkpoint.full_model_state(model)
            if d.is_main:
                metrics["eval_tau"] = held_out_tau(
                    target, config, state, held_out, cfg.eval_max_new_tokens
                )
        log.write(step, metrics)
        bar.update(1)
        bar.set_postfix_str(
            f"loss {reduced[0]:.3f} acc1 {reduced[1]:.2f} tau~{reduced[2]:.2f}"
            + (f" eval tau {metrics['eval_tau']:.2f}" if "eval_tau" in metrics else "")
        )
        if step % cfg.save_every == 0 or step == end:
            checkpoint.save_checkpoint(
                out, step, model, optimizer, scheduler, config, d, cfg.keep_checkpoints
            )
    bar.close()
    log.close()
    if step == total:  # publish the trained draft at the top of `out`
        state = checkpoint.full_model_state(model)
        if d.is_main:
            # DFly's format carries the target embedding (the loader checks it); the
            # intermediate checkpoints leave it out, which DFly loaders accept too.
            embedding = target.get_input_embeddings().weight if cfg.fusion == "dfly" else None
            checkpoint.export_draft(state, config, out, embedding)
    return out
