"""Helpers for the tests that run a real SGLang engine / server on CPU.

Every engine runs in its own process group (``sglang_driver.py`` or ``dflare serve``) under a
hard timeout and is killed by its pid's group, never inside pytest: an Engine whose child
fails can hang its parent. The environment is the plugin's own CPU recipe
(``cpu_compat.engine_env``), plus SGLang's strict idle memory check, which makes the
scheduler raise as soon as a KV slot or request slot leaks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dflare_sgl.sglang_plugin.cpu_compat import engine_env

HERE = Path(__file__).parent
ENGINE_TIMEOUT_S = 420


def driver_env(**extra: str) -> dict[str, str]:
    env = engine_env("cpu")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE)])
    env["OMP_NUM_THREADS"] = "1"
    env["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] = "1"
    env.update(extra)
    return env


def engine_kwargs(target: Path, draft: Path | None = None, **overrides) -> dict:
    """A small float32 CPU engine: radix cache on, chunked prefill at 32 tokens."""
    kwargs = {
        "model_path": str(target),
        "device": "cpu",
        "dtype": "float32",
        "attention_backend": "torch_native",
        "max_total_tokens": 6144,
        "chunked_prefill_size": 32,
        "mem_fraction_static": 0.3,
        "disable_cuda_graph": True,
        "random_seed": 0,
        "log_level": "warning",
    }
    if draft is not None:
        kwargs.update(speculative_algorithm="DFLARE", speculative_draft_model_path=str(draft))
    kwargs.update(overrides)
    return kwargs


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_engine(workdir: Path, name: str, engine: dict, jobs: list[dict], **env) -> list:
    """Run ``jobs`` against one Engine in a fresh process group; return their results."""
    spec, out, log = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec.write_text(json.dumps({"engine": engine, "jobs": jobs}))
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "sglang_driver.py"), str(spec), str(out)],
            env=driver_env(**env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=ENGINE_TIMEOUT_S)
        finally:
            kill_group(proc)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise AssertionError(f"engine run {name!r} failed (rc={proc.returncode}):\n{tail}")
    return json.loads(out.read_text())
