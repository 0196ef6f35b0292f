"""Instructions per record of the writer's per-record work (callgrind), stable on a noisy machine.

``python bench/icount.py STAGE [N1 N2]`` runs this file twice under ``valgrind --tool=callgrind``,
preparing N1 and N2 records (default 50 and 250) after 50 warm-up ones, and prints the difference of
the instruction totals divided by N2 - N1. The exchanges and records are built before, the same
whatever N is, so only the stage's work differs. Stages:

- ``finalize``: :func:`vllm_audit.finalize.finalize` of the writer bench's exchanges (1 KB prompts,
  half 20-event streams);
- ``prepare``: finalize + redact (default policy) + ``orjson.dumps``, what a prepare process does;
- ``clean2k``: the redactor on clean ~2 KB records (``bench/redaction/realistic.py``).

Before/after: ``PYTHONPATH=<older src> python bench/icount.py prepare``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("finalize", "prepare", "clean2k")


def _work(stage: str, n: int) -> None:
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, "redaction"))
    import _writer
    import orjson
    from realistic import records

    from vllm_audit import finalize
    from vllm_audit.config import Config
    from vllm_audit.writer import load_redactor

    redact = load_redactor(Config())
    exchanges = _writer.make_exchanges(350)
    recs = records(seed=11, n=300, size=2000)
    for ex in exchanges[:50]:  # warm every path (caches, lazy tables): steady state per record
        redact(finalize.finalize(ex))
    todo = exchanges[50 : 50 + n]
    if stage == "finalize":
        for ex in todo:
            finalize.finalize(ex)
    elif stage == "prepare":
        for ex in todo:
            orjson.dumps(redact(finalize.finalize(ex)))
    else:
        for rec in recs[:n]:
            redact(rec)


def _instructions(stage: str, n: int) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
    cmd += ["--work", stage, str(n)]
    # A fixed hash seed: with a random one, set and dict layouts (and so the instructions spent on
    # them) differ between the two runs, by up to ~20 % of the difference taken.
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True, env=env)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(m.group(1))


def main() -> int:
    if sys.argv[1:2] == ["--work"]:
        _work(sys.argv[2], int(sys.argv[3]))
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: python bench/icount.py {{{','.join(STAGES)}}} [N1 N2]", file=sys.stderr)
        return 2
    stage = sys.argv[1]
    n1, n2 = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (50, 250)
    if not 0 <= n1 < n2 <= 250:
        print("need 0 <= N1 < N2 <= 250", file=sys.stderr)
        return 2
    per = (_instructions(stage, n2) - _instructions(stage, n1)) / (n2 - n1)
    print(f"{stage}: {per:,.0f} instructions per record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
