"""``dflare gen-data``: regenerate responses to training prompts with the target.

The draft must imitate the target, not ShareGPT's authors, so every response is sampled from
the target itself (batched HF ``generate`` with left padding). ``--responses sharegpt`` keeps
ShareGPT's own first replies instead: no generation at all, so many times more sequences per
hour, for pretraining a draft that is then fine-tuned on regenerated data (``train
--init-draft``). Prompts are cut into shards of ``shard_size``; shard i is written only when
complete (see :func:`data.write_shard`), so a re-run skips finished shards and an interrupt
loses at most the shard in progress. Shard i samples with seed ``seed + i``: repeating the
command after an interrupt writes what an uninterrupted run would have.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids
from dflare_sgl.prompts import PROMPT_SETS
from dflare_sgl.target import load_target
from dflare_sgl.training import data


@dataclass
class GenDataConfig:
    target: str
    out: str
    prompts: str = "sharegpt"
    responses: str = "target"  # target: regenerate; sharegpt: the dataset's own replies
    limit: int | None = None
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    batch_size: int = 16
    shard_size: int = 64
    temperature: float = 0.7
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def _settings(cfg: GenDataConfig) -> dict:
    """What makes two runs produce the same data (a resumed run must match these)."""
    keep = (
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
    return {k: v for k, v in asdict(cfg).items() if k in keep}


def _respond(
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
    if cfg.responses not in ("target", "sharegpt"):
        raise ValueError(f"--responses {cfg.responses!r}: choose 'target' or 'sharegpt'")
    out = Path(cfg.out)
    model, tokenizer = load_target(cfg.target, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    identity = data.target_identity(model.config, tokenizer)
    meta = {
        "format": data.DATA_FORMAT,
        "target": cfg.target,
        "target_identity": identity,
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
    kept = []  # (conversation id, prompt token ids, reply), tokenised only as far as needed
    for prompt in data.training_prompts(source=cfg.prompts):
        if cfg.responses == "sharegpt" and not prompt.reply.strip():
            continue
        ids = encode_prompts(tokenizer, [prompt.text], chat=True)[0]
        if len(ids) <= cfg.max_prompt_tokens:
            kept.append((prompt.id, ids, prompt.reply))
        if cfg.limit is not None and len(kept) == cfg.limit:
            break
    meta["num_prompts"] = len(kept)
    data.write_json_atomic(out / data.METADATA, meta)

    stops = stop_token_ids(model, tokenizer)
    shards = [kept[i : i + cfg.shard_size] for i in range(0, len(kept), cfg.shard_size)]
    todo = [i for i in range(len(shards)) if not data.shard_path(out, i).is_file()]
    bar = tqdm(total=sum(len(shards[i]) for i in todo), unit="prompt", desc="gen-data")
    new_tokens, start = 0, time.perf_counter()
    for index in todo:
        torch.manual_seed(cfg.seed + index)
        # Similar lengths batched together: less left padding to compute.
        shard = sorted(shards[index], key=lambda item: len(item[1]))
        records = []
        for b in range(0, len(shard), cfg.batch_size):
            batch = shard[b : b + cfg.batch_size]
            if cfg.responses == "sharegpt":
                responses = _dataset_replies(tokenizer, [reply for *_, reply in batch], cfg, stops)
            else:
                with torch.inference_mode():
                    responses = _respond(model, tokenizer, [ids for _, ids, _ in batch], cfg, stops)
            for (conv_id, prompt, _), response in zip(batch, responses, strict=True):
                records.append(
                    {
                        "id": conv_id,
                        "input_ids": prompt + response,
                        "loss_mask": [0] * len(prompt) + [1] * len(response),
                    }
                )
                new_tokens += len(response)
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s")
        data.write_shard(data.shard_path(out, index), records)
    bar.close()
    return out
