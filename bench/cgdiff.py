"""Instructions per unit by function: the difference of two callgrind runs, divided by units.

``python bench/cgdiff.py SMALL.out BIG.out UNITS [TOP]`` runs ``callgrind_annotate`` (self cost,
no source annotation) on two ``valgrind --tool=callgrind --callgrind-out-file=...`` outputs of the
same program doing ``n1`` and ``n2`` units of work (start-up and warm-up alike in both), and
prints the ``TOP`` (default 40) functions by ``(BIG - SMALL) / UNITS`` with their share:
``bench/icount.py`` gives the total, this says where it goes. Add ``--inclusive`` for costs with
callees (then shares add up to more than 100 %). Under valgrind OpenSSL cannot use the CPU's
SHA extensions, so hashing shows several times its real share.

Example (the ``prepare`` stage, compiled tree in /tmp/nat)::

    for n in 50 250; do PYTHONHASHSEED=0 PYTHONPATH=/tmp/nat valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/cg.$n python bench/icount.py --work prepare $n; done
    python bench/cgdiff.py /tmp/cg.50 /tmp/cg.250 200
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys

_LINE = re.compile(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)")


def costs(path: str, inclusive: bool) -> collections.Counter[str]:
    """Instructions per function (``file:function [object]``) in one callgrind output."""
    cmd = ["callgrind_annotate", "--threshold=100", "--auto=no", f"--inclusive={'yes' if inclusive else 'no'}", path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        m = _LINE.match(line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            found[m.group(2)] += int(m.group(1).replace(",", ""))
    return found


def main(argv: list[str]) -> int:
    inclusive = "--inclusive" in argv
    args = [a for a in argv if a != "--inclusive"]
    if len(args) not in (3, 4):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    small, big = costs(args[0], inclusive), costs(args[1], inclusive)
    units = float(args[2])
    top = int(args[3]) if len(args) == 4 else 40
    diff = {name: (cost - small.get(name, 0)) / units for name, cost in big.items()}
    total = sum(v for name, v in diff.items()) if not inclusive else max(diff.values(), default=0.0)
    print(f"{'total' if not inclusive else 'largest'} per unit: {total:,.0f} instructions")
    for name, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{v:12,.0f} {100 * v / total if total else 0:5.1f} %  {name[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
