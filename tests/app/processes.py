"""The app as a separate process (`python -m app`), for tests that kill it or read its output."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.app.conftest import free_port, wait_until
from tests.conftest import REPO


@dataclass
class AppProcess:
    process: subprocess.Popen
    url: str
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_app_process(home: Path, base: Path, *, env: dict | None = None, name: str = "app") -> AppProcess:
    """Start `python -m app` on a free port (no worker, no demo prompts, no prefetcher) with its
    stdout and stderr in files beside `home`; returns once it answers HTTP."""
    port = free_port()
    stdout, stderr = home.parent / f"{name}.out", home.parent / f"{name}.err"
    command = [sys.executable, "-m", "app", "--base", str(base), "--home", str(home), "--port", str(port),
               "--no-worker", "--no-demo", "--prefetch", "0", "--threads", "1"]
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err,
                                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    app = AppProcess(process, f"http://127.0.0.1:{port}/", stdout, stderr)
    try:
        wait_until(lambda: process.poll() is not None or _answers(app.url), timeout=120, interval=0.2,
                   message="the app to answer")
    except AssertionError:
        app.stop()
        raise
    assert process.poll() is None, f"the app exited with {process.returncode}:\n{app.output()[-3000:]}"
    return app
