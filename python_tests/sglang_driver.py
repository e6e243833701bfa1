"""Run one real ``sglang.Engine`` and a list of jobs against it; write the results as JSON.

Usage: ``python sglang_driver.py SPEC.json OUT.json`` (started by ``sglang_support``, which
sets the CPU environment and enforces a hard timeout; an Engine whose child process fails
can hang its parent, so engines never run inside the pytest process).

SPEC: ``{"engine": {...Engine kwargs...}, "jobs": [{"kind": ..., ...}, ...]}``. Job kinds:
  generate      input_ids [[int]], sampling_params [dict] -> outputs [{output_ids, meta}]
  churn         input_ids, sampling_params, abort_every k: all requests streamed together,
                every k-th aborted after its first chunk -> {finished, aborted}
  flush_cache   -> bool (True only when no request holds KV)
  server_info   -> the scheduler's internal state (includes avg_spec_accept_length)
  update_draft_weights  path (a safetensors file): a live update of the DRAFT's weights from
                those tensors (SGLang's update_weights_from_tensor, selector "draft")
                -> {success, message}
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import sglang as sgl


def _generate(engine, job):
    outs = engine.generate(input_ids=job["input_ids"], sampling_params=job["sampling_params"])
    keep = ("spec_accept_length", "spec_verify_ct", "completion_tokens", "cached_tokens")
    return [
        {"output_ids": o["output_ids"], "meta": {k: o["meta_info"].get(k) for k in keep}}
        for o in outs
    ]


async def _churn(engine, job):
    aborted = finished = 0

    async def one(i, ids, params):
        nonlocal aborted, finished
        rid = f"churn-{i}"
        stream = await engine.async_generate(
            input_ids=ids, sampling_params=params, stream=True, rid=rid
        )
        async for _ in stream:
            if job["abort_every"] and i % job["abort_every"] == 0:
                engine.tokenizer_manager.abort_request(rid=rid)
                aborted += 1
                break
        else:
            finished += 1

    await asyncio.gather(
        *(
            one(i, ids, params)
            for i, (ids, params) in enumerate(zip(job["input_ids"], job["sampling_params"]))
        )
    )
    return {"finished": finished, "aborted": aborted}


def _update_draft_weights(engine, job):
    from safetensors.torch import load_file
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

    named = list(load_file(job["path"]).items())
    began, message = engine.begin_weight_update(selector="draft")
    assert began, message
    request = UpdateWeightsFromTensorReqInput(
        serialized_named_tensors=engine._serialize_tensors_per_rank(named, None),
        load_format=None,
        flush_cache=True,
        selector="draft",
    )
    success, message = engine.loop.run_until_complete(
        engine.tokenizer_manager.update_weights_from_tensor(request, None)
    )
    ended, end_message = engine.end_weight_update()
    assert ended, end_message
    return {"success": bool(success), "message": message}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    engine = sgl.Engine(**spec["engine"])
    results = []
    try:
        for job in spec["jobs"]:
            kind = job["kind"]
            if kind == "generate":
                results.append(_generate(engine, job))
            elif kind == "churn":
                results.append(engine.loop.run_until_complete(_churn(engine, job)))
            elif kind == "flush_cache":
                results.append(bool(engine.flush_cache().success))
            elif kind == "update_draft_weights":
                results.append(_update_draft_weights(engine, job))
            elif kind == "server_info":
                results.append(engine.get_server_info()["internal_states"][0])
            else:
                raise ValueError(f"unknown job kind {kind!r}")
    finally:
        engine.shutdown()
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
