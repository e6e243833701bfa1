"""``dflare serve --device cpu``: SGLang's HTTP server with DFLARE answers its endpoints.

The server runs in its own process group under a hard timeout and is killed by pid.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from sglang_support import driver_env, kill_group
from transformers import AutoConfig

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig

START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    config = DraftConfig.for_target(
        AutoConfig.from_pretrained(smollm2_dir), num_draft_layers=2, block_size=4
    )
    DFlareDraftModel(config, generator=torch.Generator().manual_seed(0)).save_pretrained(
        folder / "draft"
    )
    port = _free_port()
    cmd = [sys.executable, "-m", "dflare_sgl.cli", "serve", "--device", "cpu"]
    cmd += ["--target", str(smollm2_dir), "--draft", str(folder / "draft"), "--port", str(port)]
    cmd += ["--", "--dtype", "float32", "--mem-fraction-static", "0.3"]
    # SGLang folds accept lengths into /server_info every decode-log interval.
    cmd += ["--max-total-tokens", "4096", "--disable-cuda-graph", "--decode-log-interval", "1"]
    with open(folder / "server.log", "w") as log:  # the server keeps its own descriptor
        proc = subprocess.Popen(
            cmd, env=driver_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"server did not start (rc={proc.poll()}):\n"
                    + (folder / "server.log").read_text()[-4000:]
                )
            try:
                if requests.get(f"{url}/health_generate", timeout=30).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield url
    finally:
        kill_group(proc)


def test_generate(server):
    r = requests.post(
        f"{server}/generate",
        json={"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}},
        timeout=120,
    )
    r.raise_for_status()
    body = r.json()
    assert body["meta_info"]["completion_tokens"] == 8 and body["text"]
    assert body["meta_info"]["spec_verify_ct"] >= 1


def test_chat_completions(server):
    r = requests.post(
        f"{server}/v1/chat/completions",
        json={
            "model": "default",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0.7,
        },
        timeout=120,
    )
    r.raise_for_status()
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]


def test_server_info_reports_accept_length(server):
    requests.post(
        f"{server}/generate",
        json={"text": "1, 2, 3,", "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
        timeout=120,
    ).raise_for_status()
    info = requests.get(f"{server}/server_info", timeout=60).json()
    assert info["speculative_algorithm"] == "DFLARE"
    assert info["internal_states"][0]["avg_spec_accept_length"] >= 1.0


def test_min_p_request_is_refused(server):
    """DFLARE has no exact min_p verification, so such a request is aborted with the reason
    instead of being sampled from another distribution."""
    r = requests.post(
        f"{server}/generate",
        json={"text": "Hi", "sampling_params": {"max_new_tokens": 4, "min_p": 0.1}},
        timeout=120,
    )
    assert "DFLARE does not support min_p sampling" in r.text
