"""The top-level command: one area loaded per command, quiet on a closed pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vllm_audit import cli


def test_every_registered_command_has_its_area() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices or {})
    assert names - {"serve", "schema"} == set(cli.COMMAND_AREAS)
    for command, area in cli.COMMAND_AREAS.items():
        one = cli.build_parser(command)
        sub1 = next(a for a in one._actions if a.dest == "command")
        assert command in (sub1.choices or {}), (command, area)


def test_verify_does_not_import_the_http_and_jwt_stacks() -> None:
    code = (
        "import sys; from vllm_audit import cli; cli.build_parser('verify');"
        "print(sorted(m for m in ('aiohttp', 'jwt', 'vllm_audit.privacy.recognizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`vllm-audit verify ... | head`: no BrokenPipeError traceback (a command printing 4 MB here)."""
    code = (
        "import sys; from vllm_audit import cli;"
        "cli._schema = lambda a: (print('x' * (1 << 22)), 0)[1];"
        "sys.exit(cli.main(['schema']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away before the writer is done
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
