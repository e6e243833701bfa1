"""``dflare serve --device cpu``: SGLang's HTTP server with DFLARE answers its endpoints.

The server runs in its own process group (``ServerProcess``), started under a hard timeout
and killed by its group id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import torch
from sglang_support import driver_env
from transformers import AutoConfig

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.sglang_plugin.server_process import ServerProcess

START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    config = DraftConfig.for_target(
        AutoConfig.from_pretrained(smollm2_dir), num_draft_layers=2, block_size=4
    )
    DFlareDraftModel(config, generator=torch.Generator().manual_seed(0)).save_pretrained(
        folder / "draft"
    )
    args = ["--device", "cpu", "--target", str(smollm2_dir), "--draft", str(folder / "draft")]
    args += ["--", "--dtype", "float32", "--mem-fraction-static", "0.3"]
    # SGLang folds accept lengths into /server_info every decode-log interval.
    args += ["--max-total-tokens", "4096", "--disable-cuda-graph", "--decode-log-interval", "1"]
    with ServerProcess(args, folder / "server.log", START_TIMEOUT_S, env=driver_env()) as url:
        yield url


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
    state = info["internal_states"][0]
    assert state["avg_spec_accept_length"] >= 1.0
    # dflare serve leaves the verify length to the policy; /server_info shows its choices.
    lengths = state["dflare_verify_lengths"]
    assert lengths["adaptive"] and lengths["decode_steps"] >= 1
    assert sum(lengths["steps_by_length"].values()) == lengths["decode_steps"]


def test_min_p_request_is_refused(server):
    """DFLARE has no exact min_p verification, so such a request is aborted with the reason
    instead of being sampled from another distribution."""
    r = requests.post(
        f"{server}/generate",
        json={"text": "Hi", "sampling_params": {"max_new_tokens": 4, "min_p": 0.1}},
        timeout=120,
    )
    assert "DFLARE does not support min_p sampling" in r.text


TERMINATED_OWNER = """
import sys, time
from pathlib import Path
from dflare_sgl.sglang_plugin.server_process import ServerProcess
args = ["--device", "cpu", "--target", sys.argv[1], "--no-speculation", "--", "--dtype",
        "float32", "--mem-fraction-static", "0.3", "--disable-cuda-graph"]
with ServerProcess(args, Path(sys.argv[2]), float(sys.argv[3])) as url:
    print(ServerProcess.__name__, url, flush=True)
    time.sleep(600)
"""


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (a container's init may never reap)."""
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    alive = []
    for pid in found.split():
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(int(pid))
    return alive


def test_terminated_owner_takes_its_server_down(smollm2_dir, tmp_path):
    """SIGTERM to a process inside ``with ServerProcess(...)`` (a job scheduler stopping
    ``gen-data --backend sglang``) kills the server's process group on the way out."""
    cmd = [sys.executable, "-c", TERMINATED_OWNER, str(smollm2_dir), str(tmp_path / "server.log")]
    owner = subprocess.Popen(
        [*cmd, str(START_TIMEOUT_S)], stdout=subprocess.PIPE, text=True, env=driver_env()
    )
    server_pid = None
    try:
        assert owner.stdout.readline().startswith("ServerProcess http"), "server did not start"
        log = (tmp_path / "server.log").read_text()
        children = subprocess.run(
            ["pgrep", "-P", str(owner.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 1, (children, log[-2000:])
        server_pid = int(children[0])
        assert os.getpgid(server_pid) == server_pid  # its own process group
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _alive_in_group(server_pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_in_group(server_pid), "the server outlived its terminated owner"
    finally:
        owner.kill()
        owner.wait()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
