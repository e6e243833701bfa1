"""Target-labelled text (``dflare gen-data --responses labelled``): existing conversations,
labelled by one target prefill instead of regenerated.

A draft must learn the target's continuation, not the text's. One prefill over a conversation
gives, at every position p of an assistant turn, the target's greedy token given the text
before p and its top-k log-probabilities; no token is generated. A training block anchored at a
then has the target's greedy continuation as labels for as long as the text agrees with it
(:func:`dflare_sgl.training.blocks.build_blocks`): position k's label is the target's token
after ``x_0..x_{a+k-1}``, which is its greedy continuation of ``x_0..x_a`` exactly when
``x_{a+1..a+k-1}`` are the target's own greedy tokens.

Cost: a prefill is one batched forward over the whole text (no sequential decode steps); the
token head runs only at the positions that predict an assistant token, in row chunks, so its
``[rows, V]`` logits never grow with the batch.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

HEAD_ROWS_PER_CHUNK = 1024  # [1024, V] float32 logits: 0.2 GB at V = 49k, 0.6 GB at 152k


def conversation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    turns: tuple[tuple[str, str], ...],
    stop_ids: Collection[int],
    max_len: int,
) -> tuple[list[int], list[int]] | None:
    """``(input_ids, loss_mask)`` of a conversation in the target's chat template, cut at
    ``max_len`` tokens, with every assistant turn's text and the stop token that ends it in the
    loss mask. None when nothing of an assistant turn fits in ``max_len``, or the template
    renders a turn differently from its text (then no span can be trusted)."""
    if not tokenizer.is_fast:
        raise ValueError(
            "target-labelled text needs a fast tokenizer (its offset mapping locates the "
            "assistant turns); this target's tokenizer is not one"
        )
    messages = [{"role": role, "content": text.strip()} for role, text in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of the assistant turns' text
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        if not text.startswith(head + message["content"]):
            return None
        spans.append((len(head), len(head) + len(message["content"])))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_len], encoded["offset_mapping"][:max_len]
    mask = [0] * len(ids)
    turn = 0
    for p, (start, end) in enumerate(offsets):
        while turn < len(spans) and start >= spans[turn][1]:
            if ids[p] in stop_ids:  # the stop token right after the turn's text
                mask[p] = 1
            turn += 1
        if turn < len(spans) and start >= spans[turn][0] and end <= spans[turn][1]:
            mask[p] = 1
    mask[0] = 0  # nothing before it: no prediction labels the first token
    if sum(mask) == 0:
        return None
    return ids, mask


@torch.no_grad()
def label_batch(
    model: PreTrainedModel, sequences: list[tuple[list[int], list[int]]], top_k: int
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """One right-padded prefill of ``sequences`` (``(input_ids, loss_mask)`` pairs).

    Returns per sequence ``(target_ids, topk_ids, topk_logprobs)``: ``target_ids [S]`` the
    target's greedy token at each loss-mask position p >= 1 (from the logits at p - 1), -1
    elsewhere; ``topk_ids`` int64 / ``topk_logprobs`` float32 ``[M, top_k]`` over the M labelled
    positions in order (``[M, 0]`` when ``top_k`` is 0), log-probabilities of the full
    vocabulary, largest first."""
    device = model.device
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    predicts = torch.zeros(len(sequences), width, dtype=torch.bool)  # position p-1 labels p
    for i, (ids, mask) in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        predicts[i, : len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.bool)
    hidden = model.base_model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
    ).last_hidden_state
    rows = hidden[predicts.to(device)]  # [R, H], sequence by sequence, position order
    head = model.get_output_embeddings()
    width_k = max(top_k, 1)
    ids_out = torch.empty(rows.shape[0], width_k, dtype=torch.long)
    logprobs_out = torch.empty(rows.shape[0], width_k, dtype=torch.float32)
    for start in range(0, rows.shape[0], HEAD_ROWS_PER_CHUNK):
        chunk = slice(start, start + HEAD_ROWS_PER_CHUNK)
        logprobs = F.log_softmax(head(rows[chunk]).float(), dim=-1)
        values, indices = logprobs.topk(width_k, dim=-1)
        ids_out[chunk], logprobs_out[chunk] = indices.cpu(), values.cpu()
    out = []
    counts = predicts.sum(-1).tolist()
    for (ids, mask), ids_k, logprobs_k in zip(
        sequences, ids_out.split(counts), logprobs_out.split(counts), strict=True
    ):
        target_ids = [-1] * len(ids)
        labelled = [p for p in range(1, len(ids)) if mask[p]]
        for p, token in zip(labelled, ids_k[:, 0].tolist(), strict=True):
            target_ids[p] = token
        out.append((target_ids, ids_k[:, :top_k], logprobs_k[:, :top_k]))
    return out
