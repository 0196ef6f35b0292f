"""The projections in a child process of the serving process (``[ship] isolation``).

Sinks encode every entry (ECS, protobuf, RFC 5424 ...) and talk to remote systems; in the serving
process they would share its CPU and GIL with the event loop. A :class:`ShipperProcess` starts
``python -m vllm_audit.ship.child CONFIG`` instead, restarts it with backoff if it dies, stops it
with the server, and renders its projections' status files into the server's ``/metrics``.

The child reads the log like any other reader: up to each writer's published durable count
(``writers/<id>/durable``, rewritten after every fsync) or its last signed checkpoint. It exits on
SIGTERM and by itself when its parent is gone. Several serving processes on one log directory
(gateway workers, vLLM API processes) each start one; the projection locks make exactly one of
them run each projection.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading

import orjson

from vllm_audit.config import Config
from vllm_audit.ship.base import Status
from vllm_audit.ship.config import state_dir
from vllm_audit.ship.runner import render_status_metrics

log = logging.getLogger("vllm_audit.ship")

_STATUS_FIELDS = set(Status.__dataclass_fields__)


def wants_process(config: Config) -> bool:
    """Does ``[ship] isolation`` put the projections in a child process for this config?"""
    mode = config.ship.isolation
    if mode != "auto":
        return mode == "process"
    return bool(config.sinks) or config.detect.enabled or config.archive.enabled


class ShipperProcess:
    """Start, supervise and stop the child process that runs every projection."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = state_dir(config.ship, config.log.dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="vllm-audit-shipper", daemon=True)
        self._config_file = ""
        self.restarts = 0

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"shipper-{os.getpid()}-", suffix=".config.pickle", dir=self.state)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(self.config, f)
        self._config_file = path
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_audit.ship.child", self._config_file, str(os.getpid())],
            stdin=subprocess.DEVNULL,
        )

    def _supervise(self) -> None:
        delay = 0.5
        while not self._stop.wait(1.0):
            proc = self._proc
            if proc is None or proc.poll() is None:
                delay = 0.5
                continue
            log.warning("the shipper process exited (code %s); restarting in %.1f s", proc.returncode, delay)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 30.0)
            self.restarts += 1
            self._spawn()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._config_file:
            try:
                os.unlink(self._config_file)
            except OSError:
                pass

    def notify(self) -> None:
        """New entries are durable: the child sees them through the published durable count."""

    def statuses(self) -> list[Status]:
        """The status the child last wrote for each projection (``<state>/<name>.status.json``)."""
        out = []
        for path in sorted(self.state.glob("*.status.json")):
            try:
                raw = orjson.loads(path.read_bytes())
                out.append(Status(**{k: v for k, v in raw.items() if k in _STATUS_FIELDS}))
            except (OSError, orjson.JSONDecodeError, TypeError):
                continue
        return out

    def render_metrics(self) -> list[str]:
        return render_status_metrics(self.statuses())


def main(argv: list[str]) -> int:
    from vllm_audit._gc import tune_gc_for_serving
    from vllm_audit.ship.build import build_runner

    config_file, parent = argv[0], int(argv[1]) if len(argv) > 1 else 0
    with open(config_file, "rb") as f:
        config = pickle.load(f)  # written by our own parent process, mode 0600 in the state dir
    if not isinstance(config, Config):
        print("vllm-audit shipper: not a configuration", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = build_runner(config)
    if runner is None:
        return 0
    tune_gc_for_serving()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    runner.start()
    while not done.wait(1.0):
        if parent and os.getppid() != parent:  # the serving process is gone
            break
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
