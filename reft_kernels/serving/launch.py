"""A server in a child process: ``python -m reft_kernels.serving ARGS`` on a free local port,
returned once ``/health`` answers. For tests, benchmarks and scripts that need a live server;
the child imports ``reft_kernels`` from ``cwd`` / ``PYTHONPATH`` as given, so a benchmark can
start an older checkout's server from the current one. Standard library only."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Mapping, Optional, Sequence, Tuple

__all__ = ["free_port", "launch_server", "http_client_module"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(args: Sequence[str], *, cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, log_hint: str = "",
                  timeout_s: float = 120.0) -> Tuple[subprocess.Popen, str]:
    """(process, base URL) of ``python -m reft_kernels.serving --port <free> ARGS``, once its
    ``/health`` answers. ``env`` replaces the child's environment (default: this one's).
    If the child exits first, or ``timeout_s`` passes, it raises ``RuntimeError`` with the
    child's output (when ``stdout`` is a pipe) or ``log_hint`` (where its log went)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reft_kernels.serving", "--port", str(port), *args],
                            cwd=cwd, env=dict(os.environ if env is None else env), stdout=stdout,
                            stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout is not None else log_hint
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{out}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer /health within {timeout_s:.0f} s {log_hint}".rstrip())


def http_client_module():
    """The HTTP library the ``openai`` client uses (``httpx``, or ``httpx2`` where it is renamed);
    ``ImportError`` if neither is installed (``pip install -e ".[serve]"`` brings it)."""
    for name in ("httpx2", "httpx"):
        try:
            return __import__(name)
        except ImportError:
            continue
    raise ImportError('neither httpx nor httpx2 is installed; pip install -e ".[serve]"')
