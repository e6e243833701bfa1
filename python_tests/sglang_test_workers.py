"""TEST-ONLY DFLARE workers, selected with the plugin's hook ``DFLARE_SGLANG_WORKER``.

* ``OracleDraftWorker`` drafts known-correct continuations (long acceptance):
  ``DFLARE_TEST_ORACLE`` names a JSON file ``{"entries": [{"prompt": [ids], "continuation":
  [ids]}], "corrupt_every": k, "error_rate": p}``; one draft token is corrupted in every k-th
  block (k=0: never) so that blocks also end in a rejection, and each continuation position
  is wrong with probability p (drawn once per entry from a fixed seed, so runs repeat; with
  block B the accept length approaches ``sum_{j<B} (1-p)**j``, as ``oracle_draft.py``'s).
* ``ContinuationRecordingWorker`` leaves the drafts alone and appends each finished
  request's ``{"prompt", "continuation"}`` to ``DFLARE_TEST_RECORD_OUTPUTS`` (JSONL): the
  oracle's entries for prompts it did not choose (a benchmark's).
* ``DraftRecordingWorker`` leaves the drafts alone and records them (``DFLARE_TEST_RECORD``),
  and every tensor-parallel sync call of the verify step (``DFLARE_TEST_SYNC_RECORD``, if set).

Everything but the draft-token head is the real DFlareWorker (draft forward, layer_mix_kv,
verify_block, commit / rollback).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dflare_sgl.sglang_plugin.worker import DFlareWorker


class _BatchAwareWorker(DFlareWorker):
    """Keeps the batch being decoded, so the draft head can see its requests."""

    def forward_batch_generation(self, batch, *args, **kwargs):
        self._batch = batch
        return super().forward_batch_generation(batch, *args, **kwargs)


class OracleDraftWorker(_BatchAwareWorker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        spec = json.loads(Path(os.environ["DFLARE_TEST_ORACLE"]).read_text())
        vocab = self.model_config.vocab_size
        error_rate = float(spec.get("error_rate", 0.0))
        g = torch.Generator().manual_seed(0)
        self._sequences = {}
        for e in spec["entries"]:
            truth = torch.tensor(e["continuation"], dtype=torch.int64)
            wrong = torch.rand(truth.shape, generator=g) < error_rate
            drafts = torch.where(wrong, (truth + 1) % vocab, truth).tolist()
            self._sequences[tuple(e["prompt"])] = e["prompt"] + drafts
        self._corrupt_every = int(spec.get("corrupt_every", 0))

    def _greedy_sample_from_vocab_parallel_head(self, *, hidden_states, lm_head, **kwargs):
        drafted = super()._greedy_sample_from_vocab_parallel_head(
            hidden_states=hidden_states, lm_head=lm_head, **kwargs
        )
        batch, width = self._batch, int(self.block_size) - 1
        drafted = drafted.view(len(batch.reqs), width)
        for i, (req, prefix) in enumerate(zip(batch.reqs, batch.seq_lens.tolist(), strict=True)):
            known = self._sequences.get(tuple(req.origin_input_ids))
            if known is None:
                continue
            # The block is [x_last, d_1..]: x_last sits at position `prefix`.
            future = known[prefix + 1 : prefix + 1 + width]
            drafted[i, : len(future)] = torch.tensor(future, dtype=drafted.dtype)
            if self._corrupt_every and prefix % self._corrupt_every == 0 and future:
                k = prefix % len(future)
                drafted[i, k] = (drafted[i, k] + 1) % lm_head.weight.shape[0]
        return drafted.flatten()


class _RecordedTpSync:
    """SGLang's SpecTpSync with each ``sync`` call appended to a JSONL file first (at TP = 1
    nothing is broadcast; the record shows what a TP > 1 deployment would broadcast)."""

    def __init__(self, inner, path: str) -> None:
        self._inner, self._path = inner, path

    def sync(self, site, values: torch.Tensor) -> torch.Tensor:
        with open(self._path, "a") as f:
            record = {"site": site.name, "dtype": str(values.dtype), "values": values.tolist()}
            f.write(json.dumps(record) + "\n")
        return self._inner.sync(site, values)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class DraftRecordingWorker(_BatchAwareWorker):
    """Records what the real draft proposes: for each request and verify step, ``{"prompt",
    "prefix", "block": [x_last, d_1 .. d_{B-1}]}`` appended to the JSONL file named by
    ``DFLARE_TEST_RECORD`` (drafts unchanged; for parity with the reference draft model)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if os.environ.get("DFLARE_TEST_SYNC_RECORD"):
            self._tp_sync = _RecordedTpSync(self._tp_sync, os.environ["DFLARE_TEST_SYNC_RECORD"])

    def _greedy_sample_from_vocab_parallel_head(self, *, hidden_states, lm_head, **kwargs):
        drafted = super()._greedy_sample_from_vocab_parallel_head(
            hidden_states=hidden_states, lm_head=lm_head, **kwargs
        )
        batch = self._batch
        rows = drafted.view(len(batch.reqs), -1).tolist()
        bonus = batch.spec_info.bonus_tokens.view(-1).tolist()
        with open(os.environ["DFLARE_TEST_RECORD"], "a") as f:
            for req, prefix, x_last, row in zip(
                batch.reqs, batch.seq_lens.tolist(), bonus, rows, strict=True
            ):
                record = {"prompt": list(req.origin_input_ids), "prefix": prefix}
                f.write(json.dumps({**record, "block": [x_last, *row]}) + "\n")
        return drafted


class ContinuationRecordingWorker(_BatchAwareWorker):
    """Records every finished request's prompt and output ids (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._running = {}

    def forward_batch_generation(self, batch, *args, **kwargs):
        self._running.update((req.rid, req) for req in batch.reqs)
        return super().forward_batch_generation(batch, *args, **kwargs)

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        super().note_request_finished(rid=rid, natural_stop=natural_stop)
        req = self._running.pop(rid, None)
        if req is not None:
            record = {"prompt": list(req.origin_input_ids), "continuation": list(req.output_ids)}
            with open(os.environ["DFLARE_TEST_RECORD_OUTPUTS"], "a") as f:
                f.write(json.dumps(record) + "\n")
