"""``dflare gen-data --backend sglang|URL``: regenerate responses with an SGLang server.

SGLang batches continuously: every prompt of a shard goes to the server in one ``/generate``
request and it schedules them as memory allows, instead of HF ``generate``'s fixed,
left-padded batches that wait for their longest response. ``--backend sglang`` starts the
target alone (``dflare serve --no-speculation``, its own process group, killed when gen-data
ends); ``--backend http://HOST:PORT`` uses a running server of the same target (e.g. one
launched on GPUs with ``python -m sglang.launch_server --model-path Qwen/Qwen3-8B``).

Greedy data (``--temperature 0``) is deterministic. Sampled data follows the server's random
state, not gen-data's per-shard seed: a re-run after an interrupt writes new samples (from the
same distribution) for the shards it had not finished.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import requests

from dflare_sgl.sglang_plugin.server_process import ServerProcess

REQUEST_TIMEOUT_S = 3600  # one shard of prompts per request


@contextmanager
def sglang_server(
    backend: str, target: str, device: str, dtype: str, seed: int, max_total_tokens: int
):
    """Yields the base URL of the server ``backend`` names: ``"sglang"`` starts one for
    ``target``, anything else is the URL of a running one (checked to answer).
    ``max_total_tokens``: the KV pool a started CPU server gets (SGLang sizes it from the
    machine's whole memory otherwise: 16 GB of 23 here); a GPU server sizes its own."""
    if backend != "sglang":
        url = backend.rstrip("/")
        try:
            requests.get(f"{url}/health_generate", timeout=60).raise_for_status()
        except requests.RequestException as e:
            raise ValueError(
                f"--backend {backend}: no SGLang server answers there ({e}); start one "
                "(`dflare serve --no-speculation` or `python -m sglang.launch_server`) or pass "
                "--backend sglang to have gen-data start it"
            ) from None
        yield url
        return
    args = ["--target", target, "--device", device, "--no-speculation", "--"]
    args += ["--dtype", dtype, "--random-seed", str(seed), "--log-level", "warning"]
    if device == "cpu":
        args += ["--disable-cuda-graph", "--max-total-tokens", str(max_total_tokens)]
    with tempfile.TemporaryDirectory() as folder:
        with ServerProcess(args, Path(folder) / "server.log") as url:
            yield url


def sglang_responses(
    url: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    stops: tuple[int, ...],
) -> list[list[int]]:
    """Responses (token ids, ending with the stop token when one ended them) of ``prompts``."""
    sampling = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": -1,
        "stop_token_ids": list(stops),
        "skip_special_tokens": False,
    }
    r = requests.post(
        f"{url}/generate",
        json={"input_ids": prompts, "sampling_params": sampling},
        timeout=REQUEST_TIMEOUT_S,
    )
    r.raise_for_status()
    responses = []
    for out in r.json():
        ids = list(out["output_ids"])
        finish = out["meta_info"].get("finish_reason") or {}
        matched = finish.get("matched")
        # SGLang leaves the matched stop token out of output_ids; HF's responses end with it.
        if finish.get("type") == "stop" and isinstance(matched, int) and ids[-1:] != [matched]:
            ids.append(matched)
        responses.append(ids)
    return responses
