"""Start the stock SGLang server as a user does (a subprocess of its launcher), talk to it over HTTP, stop it.

Used by the serving demo, the serving benchmark and the end-to-end tests, so all three
exercise the same path a user types: ``python -m sglang.launch_server ... --moe-policy P``
(or ``sglang serve ...``). Only the standard library is used for HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

READY_MARK = "The server is fired up and ready to roll"
BIND_ERROR = "error while attempting to bind on address"


class ServerError(RuntimeError):
    """The server did not start, or died; carries the tail of its log."""


class PortTaken(Exception):
    """The chosen port was taken before the server bound it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One SGLang server process tree. ``with Server(model, policy=...) as s: s.generate(...)``."""

    model_path: str | Path
    policy: str | Path | None = None
    device: str | None = "cpu"
    dtype: str | None = "float32"
    extra_args: Sequence[str] = ()
    entry: str = "launch_server"  # or "serve" (the `sglang serve` console entry point)
    port: int = 0
    env: dict[str, str | None] = field(default_factory=dict)  # added to the environment; None removes a variable
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    started_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.entry == "serve":
            head = [sys.executable, "-c", "import sys; from sglang.cli.main import main; sys.argv[0] = 'sglang'; "
                                          "sys.exit(main())", "serve"]
        else:
            head = [sys.executable, "-m", "sglang.launch_server"]
        cmd = head + ["--model-path", str(self.model_path), "--port", str(self.port), "--host", "127.0.0.1"]
        if self.device:
            cmd += ["--device", self.device]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.policy:
            cmd += ["--moe-policy", str(self.policy)]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 600.0, tries: int = 3) -> "Server":
        """Launch and wait until ready. A port picked here can be taken by another process before the server
        binds it (uvicorn then logs the error and hangs in shutdown): that launch is stopped and retried."""
        pick = not self.port
        for attempt in range(tries):
            if pick:
                self.port = free_port()
            try:
                return self._start_once(timeout)
            except PortTaken:
                if not pick or attempt == tries - 1:
                    raise ServerError(f"port {self.port} is already in use:\n{self.log_tail()}") from None
                self.log_path = None
        raise AssertionError("unreachable")

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, with :attr:`env` added (None removes a variable)."""
        return {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}

    def run_to_exit(self, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """Run the launch command in the foreground until it exits, capturing its output (for launches that
        end by themselves: refused settings, ``--help``)."""
        return subprocess.run(self.command(), capture_output=True, text=True, timeout=timeout,
                              env=self.environment())

    def _start_once(self, timeout: float) -> "Server":
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = self.environment()
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with status {self.proc.returncode} before it was ready:\n"
                                  f"{self.log_tail()}")
            text = self.log()
            if BIND_ERROR in text:
                self.stop()
                raise PortTaken(self.port)
            if READY_MARK in text and self._healthy():
                self.started_s = time.monotonic() - t0
                return self
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise ServerError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def healthy(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._healthy()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the launcher's process group, then SIGKILL whatever is left; returns the exit status."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # workers that outlived the launcher
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 60.0) -> Any:
        """GET JSON; returns the decoded reply (:class:`HTTPError` on an HTTP error)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise HTTPError(e.code, e.read().decode(errors="replace")) from None

    def post(self, path: str, payload: dict, timeout: float = 600.0) -> Any:
        """POST JSON; returns the decoded reply. An HTTP error raises :class:`HTTPError` with the body."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise HTTPError(e.code, e.read().decode(errors="replace")) from None

    def generate(self, prompt: str | list[int], max_new_tokens: int = 16, **sampling: Any) -> dict:
        """SGLang's native ``/generate``, greedy unless ``sampling`` says otherwise; the reply dict."""
        key = "text" if isinstance(prompt, str) else "input_ids"
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **sampling}
        return self.post("/generate", {key: prompt, "sampling_params": params})


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body
