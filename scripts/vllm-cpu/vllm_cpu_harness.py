"""Start and stop real vLLM servers (and the vllm-audit gateway) for tests and benchmarks.

Used by ``tests/vllm/conftest.py`` and ``bench/vllm/overhead.py``; no dependency outside the
standard library. Every server runs in its own process group (``start_new_session``) so that
stopping it also stops vLLM's engine-core and extra API-server processes.

    setup = ensure_setup()                       # runs scripts/vllm-cpu/setup.sh, reads ready.env
    srv = start_vllm(setup, log_dir, extra_args=["--middleware", "vllm_audit.AuditMiddleware"],
                     env={"VLLM_AUDIT_CONFIG": cfg})
    try: ... srv.url ...
    finally: srv.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SETUP_SH = HERE / "setup.sh"
SERVE_SH = HERE / "serve.sh"

#: Start-to-healthy of the eager tiny model is 48-90 s on 2 busy cores; leave room.
DEFAULT_HEALTH_TIMEOUT_S = 240.0


class SetupError(RuntimeError):
    """setup.sh failed; ``log`` has its output."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class ServerError(RuntimeError):
    """A server did not become healthy; the message carries its log tail."""


@dataclasses.dataclass(frozen=True)
class Setup:
    home: Path
    venv: Path
    model: Path
    versions: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def vllm_audit(self) -> Path:
        return self.venv / "bin" / "vllm-audit"


def vllm_home() -> Path:
    env = os.environ.get("VLLM_AUDIT_VLLM_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "vllm-audit" / "vllm-cpu"


def read_marker(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def ensure_setup(timeout_s: float = 1800.0, quiet: bool = True) -> Setup:
    """Run setup.sh (quick when the install is already healthy) and describe the result."""
    try:
        proc = subprocess.run(
            ["bash", str(SETUP_SH)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"setup.sh timed out after {timeout_s:.0f} s", str(exc.output or "")) from None
    if not quiet:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise SetupError(f"setup.sh exited with {proc.returncode}:\n{tail}", proc.stdout)
    marker = read_marker(vllm_home() / "ready.env")
    return Setup(
        home=Path(marker["VLLM_AUDIT_VLLM_HOME"]),
        venv=Path(marker["VLLM_AUDIT_VLLM_VENV"]),
        model=Path(marker["VLLM_AUDIT_VLLM_MODEL"]),
        versions={k: v for k, v in marker.items() if k.endswith("_VERSION")},
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    health_path: str = "/health"
    #: Any HTTP answer on health_path means "up" (for servers whose health route may not exist).
    any_status_ok: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self, timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S) -> float:
        """Poll the health path until 200; returns seconds waited. Raises ServerError with the log tail."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode} before becoming healthy; "
                    f"log {self.log_path} tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except urllib.error.HTTPError as exc:
                if self.any_status_ok:
                    return time.monotonic() - t0
                exc.close()
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            time.sleep(0.5)
        raise ServerError(
            f"{self.name} not healthy at {self.url}{self.health_path} after {timeout_s:.0f} s; "
            f"log {self.log_path} tail:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the server's process group (it is the group leader), then SIGKILL what remains."""
        pgid = self.proc.pid
        if self.proc.poll() is None or _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not _group_alive(pgid):
                    break
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def children(self) -> list[int]:
        """Direct child pids (e.g. the engine core, extra API servers)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spawn(
    name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None, port: int, health_path: str = "/health"
) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    # The dev venv's variables must not leak into the vLLM venv's interpreter.
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        full_env.pop(k, None)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    with open(log_path, "ab") as logf:
        logf.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )
    return Server(name=name, proc=proc, port=port, log_path=log_path, health_path=health_path)


def start_vllm(
    setup: Setup,
    log_path: Path,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait: bool = True,
    timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
) -> Server:
    """``serve.sh`` (vllm serve on the tiny model, bounded KV cache, eager) on a free port."""
    port = port or free_port()
    e = {"PORT": str(port), "HOST": "127.0.0.1", "VLLM_AUDIT_VLLM_HOME": str(setup.home)}
    if env:
        e.update(env)
    srv = _spawn("vllm", ["bash", str(SERVE_SH), *(extra_args or [])], log_path, e, port)
    if wait:
        try:
            srv.wait_healthy(timeout_s)
        except BaseException:
            srv.stop()
            raise
    return srv


def start_gateway(
    setup: Setup,
    upstream: str,
    config_path: Path,
    log_path: Path,
    port: int | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    health_path: str = "/healthz",
    wait: bool = True,
    timeout_s: float = 60.0,
) -> Server:
    """``vllm-audit serve --upstream URL --config CFG --port P`` from the vLLM venv (editable install)."""
    port = port or free_port()
    cmd = [
        str(setup.vllm_audit),
        "serve",
        "--upstream",
        upstream,
        "--config",
        str(config_path),
        "--port",
        str(port),
        *(extra_args or []),
    ]
    srv = _spawn("vllm-audit gateway", cmd, log_path, env, port, health_path=health_path)
    srv.any_status_ok = True
    if wait:
        try:
            srv.wait_healthy(timeout_s)
        except BaseException:
            srv.stop()
            raise
    return srv


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # the command name may contain spaces/parens: split after the last ')'
    fields = data[data.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    s = ensure_setup(quiet=False)
    print(s)
    srv = start_vllm(s, s.home / "smoke-server.log", extra_args=sys.argv[1:])
    print("healthy:", srv.url, "pid", srv.pid, "children", srv.children())
    srv.stop()
    print("stopped")
