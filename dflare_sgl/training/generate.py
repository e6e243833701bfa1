"""``dflare gen-data``: regenerate responses to training prompts with the target.

The draft must imitate the target, not ShareGPT's authors, so every response is sampled from
the target itself (batched HF ``generate`` with left padding, or an SGLang server with
``--backend``: :mod:`sglang_responses`). ``--responses sharegpt`` keeps
ShareGPT's own first replies instead: no generation at all, so many times more sequences per
hour, for pretraining a draft that is then fine-tuned on regenerated data (``train
--init-draft``). ``--responses labelled`` keeps every assistant turn of the conversations and
labels it with one batched target prefill (:mod:`target_labels`): the target's greedy token and
top-k log-probabilities at each position, which training uses as labels and soft targets.
Prompts are cut into shards of ``shard_size``; shard i is written only when
complete (see :func:`data.write_shard`), so a re-run skips finished shards and an interrupt
loses at most the shard in progress. Shard i samples with seed ``seed + i``: repeating the
command after an interrupt writes what an uninterrupted run would have (HF ``generate``; an
SGLang server samples from its own random state).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from dflare_sgl.cli_helpers import encode_prompts, eos_token_ids, stop_token_ids
from dflare_sgl.prompts import PROMPT_SETS
from dflare_sgl.target import load_target, resolve_target
from dflare_sgl.training import data
from dflare_sgl.training.sglang_responses import sglang_responses, sglang_server
from dflare_sgl.training.target_labels import conversation_tokens, label_batch

RESPONSES = ("target", "sharegpt", "labelled")


@dataclass
class GenDataConfig:
    target: str
    out: str
    prompts: str = "sharegpt"
    # target: regenerate; sharegpt: the dataset's own first replies; labelled: every assistant
    # turn, labelled by a target prefill
    responses: str = "target"
    limit: int | None = None
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    batch_size: int | None = None  # None: default_batch_size()
    shard_size: int = 64
    temperature: float = 0.7
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "hf"  # regeneration: hf, sglang, or a running SGLang server's URL
    top_k: int = 8  # labelled: log-probabilities kept per position (0: greedy labels only)
    max_len: int = 1024  # labelled: conversations cut at this many tokens


def default_batch_size(responses: str, device: str) -> int:
    """16, except for labelled text on a CPU: 1, because a padded batch's attention costs more
    there than batching saves (measured in benchmarks/RESULTS.md: 371 labelled tokens/s at
    batch 1, 360 at 4, 288 at 16 on 2 cores); a long conversation already fills the GEMMs."""
    return 1 if responses == "labelled" and device == "cpu" else 16


def _settings(cfg: GenDataConfig) -> dict:
    """What makes two runs produce the same data (a resumed run must match these)."""
    labelled = ("top_k", "max_len") if cfg.responses == "labelled" else ()
    settings = {"backend": "sglang"} if cfg.backend != "hf" else {}  # an engine samples its way
    keep = labelled + (
        "prompts",
        "responses",
        "limit",
        "max_new_tokens",
        "max_prompt_tokens",
        "shard_size",
        "temperature",
        "seed",
        "dtype",
    )
    return settings | {k: v for k, v in asdict(cfg).items() if k in keep}


def sample_responses(
    model, tokenizer, prompts: list[list[int]], cfg: GenDataConfig, stops
) -> list[list[int]]:
    """Sampled responses (token ids, ending at the first stop token if one came) of a batch."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attention = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device
    )
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(
        input_ids=ids,
        attention_mask=attention,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=list(stops),
        **(sampling if cfg.temperature > 0 else {"do_sample": False}),
    )
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:end])
    return responses


def _dataset_replies(tokenizer, replies: list[str], cfg: GenDataConfig, stops) -> list[list[int]]:
    """ShareGPT's replies as response token ids: cut at ``max_new_tokens``, else ended by the
    stop token, as a generated response would be."""
    out = []
    for reply in replies:
        ids = tokenizer.encode(reply.strip(), add_special_tokens=False)
        out.append(
            ids[: cfg.max_new_tokens] if len(ids) >= cfg.max_new_tokens else ids + [stops[0]]
        )
    return out


def generate_data(cfg: GenDataConfig) -> Path:
    """Write (or finish) the data folder ``cfg.out``; returns it."""
    if cfg.prompts in PROMPT_SETS:
        raise ValueError(
            f"--prompts {cfg.prompts!r}: training prompts come from 'sharegpt' or a JSONL file "
            "(the evaluation sets are held out on purpose)"
        )
    if cfg.responses not in RESPONSES:
        raise ValueError(f"--responses {cfg.responses!r}: choose one of {', '.join(RESPONSES)}")
    if cfg.top_k < 0:
        raise ValueError(f"--top-k {cfg.top_k}: must be >= 0 (0 keeps greedy labels only)")
    engine = cfg.backend != "hf"
    if engine and cfg.responses != "target":
        raise ValueError(
            f"--backend {cfg.backend}: a serving engine regenerates responses (--responses "
            f"target); --responses {cfg.responses} runs no generation, use --backend hf"
        )
    out = Path(cfg.out)
    # With an engine the weights live in its server: only the target's files are read here.
    model, config, tokenizer, stops = _load_target(cfg, weights=not engine)
    meta = {
        "format": data.DATA_FORMAT,
        "target": cfg.target,
        "target_identity": data.target_identity(config, tokenizer),
        "settings": _settings(cfg),
    }
    if (out / data.METADATA).is_file():
        old = data.read_metadata(out)
        # Folders made before --responses existed hold regenerated responses.
        old["settings"] = {"responses": "target", **old.get("settings", {})}
        if {k: old.get(k) for k in ("target_identity", "settings")} != {
            k: meta[k] for k in ("target_identity", "settings")
        }:
            raise ValueError(
                f"{out} holds data made with another target or settings ({old.get('settings')}); "
                "choose a new --out folder, or repeat the original command to resume"
            )
    out.mkdir(parents=True, exist_ok=True)
    kept = _kept_prompts(cfg, tokenizer, stops)
    meta["num_prompts"] = len(kept)
    data.write_json_atomic(out / data.METADATA, meta)

    shards = [kept[i : i + cfg.shard_size] for i in range(0, len(kept), cfg.shard_size)]
    todo = [i for i in range(len(shards)) if not data.shard_path(out, i).is_file()]
    batch_size = cfg.batch_size or default_batch_size(cfg.responses, cfg.device)
    kv_tokens = cfg.shard_size * (cfg.max_prompt_tokens + cfg.max_new_tokens)  # a shard at once
    server = (
        sglang_server(cfg.backend, cfg.target, cfg.device, cfg.dtype, cfg.seed, kv_tokens)
        if engine
        else nullcontext()
    )
    with server as url, torch.inference_mode():
        bar = tqdm(total=sum(len(shards[i]) for i in todo), unit="prompt", desc="gen-data")
        new_tokens, start = 0, time.perf_counter()

        def batches(shard: list, size: int):
            for b in range(0, len(shard), size):
                batch = shard[b : b + size]
                yield batch
                bar.update(len(batch))

        for index in todo:
            torch.manual_seed(cfg.seed + index)
            # Similar lengths batched together: less padding to compute.
            shard = sorted(shards[index], key=lambda item: len(item[1]))
            path = data.shard_path(out, index)
            if cfg.responses == "labelled":
                records, topk_ids, topk_logprobs = [], [], []
                for batch in batches(shard, batch_size):
                    labels = label_batch(model, [(ids, mask) for _, ids, mask in batch], cfg.top_k)
                    for (conv_id, ids, mask), (target_ids, ids_k, logprobs_k) in zip(
                        batch, labels, strict=True
                    ):
                        records.append(
                            {
                                "id": conv_id,
                                "input_ids": ids,
                                "loss_mask": mask,
                                "target_ids": target_ids,
                            }
                        )
                        topk_ids.append(ids_k)
                        topk_logprobs.append(logprobs_k)
                if cfg.top_k > 0:
                    data.write_soft_targets(path, torch.cat(topk_ids), torch.cat(topk_logprobs))
            else:
                # An engine schedules a whole shard itself (continuous batching).
                responses = []
                for batch in batches(shard, len(shard) if engine else batch_size):
                    prompts = [ids for _, ids, _ in batch]
                    if cfg.responses == "sharegpt":
                        replies = [reply for *_, reply in batch]
                        responses += _dataset_replies(tokenizer, replies, cfg, stops)
                    elif engine:
                        responses += sglang_responses(
                            url, prompts, cfg.max_new_tokens, cfg.temperature, stops
                        )
                    else:
                        responses += sample_responses(model, tokenizer, prompts, cfg, stops)
                records = [
                    {
                        "id": conv_id,
                        "input_ids": prompt + response,
                        "loss_mask": [0] * len(prompt) + [1] * len(response),
                    }
                    for (conv_id, prompt, _), response in zip(shard, responses, strict=True)
                ]
            data.write_shard(path, records)
            new_tokens += sum(sum(r["loss_mask"]) for r in records)
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s")
        bar.close()
    return out


def _load_target(cfg: GenDataConfig, weights: bool):
    """``(model or None, config, tokenizer, stop ids)``; ``weights=False`` reads the target's
    config, generation config and tokenizer only."""
    if weights:
        dtype = getattr(torch, cfg.dtype)
        model, tokenizer = load_target(cfg.target, dtype=dtype, device=cfg.device)
        return model, model.config, tokenizer, stop_token_ids(model, tokenizer)
    folder = resolve_target(cfg.target)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's EOS
        generation = GenerationConfig.from_model_config(config)
    return None, config, tokenizer, eos_token_ids(generation, tokenizer)


def _kept_prompts(cfg: GenDataConfig, tokenizer, stops) -> list[tuple[str, list[int], object]]:
    """``(id, token ids, rest)`` per kept prompt, tokenised only as far as ``limit`` needs:
    labelled, the whole conversation and its loss mask; else the prompt and ShareGPT's reply."""
    labelled = cfg.responses == "labelled"
    kept = []
    for prompt in data.iter_training_prompts(source=cfg.prompts, whole_conversations=labelled):
        if labelled:
            tokens = conversation_tokens(tokenizer, prompt.conversation, stops, cfg.max_len)
            if tokens is not None:
                kept.append((prompt.id, *tokens))
        elif cfg.responses == "target" or prompt.reply.strip():
            ids = encode_prompts(tokenizer, [prompt.text], chat=True)[0]
            if len(ids) <= cfg.max_prompt_tokens:
                kept.append((prompt.id, ids, prompt.reply))
        if cfg.limit is not None and len(kept) == cfg.limit:
            break
    return kept
