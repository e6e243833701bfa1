"""An SGLang server as a child process: ``dflare serve`` started in its own process group,
waited for until it answers ``/health_generate``, and killed by its group id when done (a
server's scheduler and detokenizer are children of its own; killing the group leaves none),
also when the process that owns it is terminated (SIGTERM: a job scheduler, ``timeout``).

Used where the project needs a server for a while (``dflare gen-data --backend sglang``,
``benchmarks/bench_sglang_serving.py``), never in the serving path itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


class ServerProcess:
    """``with ServerProcess(serve_args, log) as url:`` a running server at ``url``.

    ``serve_args``: the arguments of ``dflare serve`` after the verb, without ``--port``
    (e.g. ``["--target", T, "--device", "cpu", "--no-speculation", "--", "--dtype",
    "float32"]``); ``log``: the file that receives the server's output, quoted when it fails to
    start within ``start_timeout_s``; ``env``: variables added to this process's environment
    for the server."""

    def __init__(
        self,
        serve_args: list[str],
        log: Path,
        start_timeout_s: float = 600,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = list(serve_args)
        cut = args.index("--") if "--" in args else len(args)
        args[cut:cut] = ["--port", str(self.port)]
        self.cmd = [sys.executable, "-m", "dflare_sgl.cli", "serve", *args]
        self.log, self.start_timeout_s = Path(log), start_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._previous_sigterm = None

    def __enter__(self) -> str:
        # SIGTERM's default action ends this process without leaving the ``with``, and the
        # server (its own session) would live on: exit through Python instead. Only where no
        # one else handles SIGTERM, and only the main thread may set handlers.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        with self.log.open("w") as out:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if requests.get(f"{self.url}/health_generate", timeout=30).ok:
                        return self.url
                except requests.ConnectionError:
                    pass
                time.sleep(2)
            raise RuntimeError(
                f"the SGLang server did not start (exit code {self.proc.poll()}); its log, "
                f"{self.log}, ends with:\n{self.log.read_text()[-3000:]}"
            )
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
