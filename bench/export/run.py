"""Export benchmark: export 100,000 records of one tenant (time, bundle size), then verify-bundle (records/s).

One command: ``.venv/bin/python bench/export/run.py [--records N]``. It writes a log of ~1 KB records
through the real Chain (two tenants, the exported one holding half), exports one tenant for the
whole range, and runs the single-file verifier over the bundle. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.export.conftest import TenantLog, rec, write_phases  # noqa: E402
from vllm_audit.config import load_config  # noqa: E402
from vllm_audit.export.bundle import build_bundle  # noqa: E402
from vllm_audit.export.standalone import load_keys, read_bundle, verify  # noqa: E402
from vllm_audit.integrity.keys import load_public_keys, write_keypair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000, help="records of the exported tenant")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="vllm-audit-bench-export-"))
    write_keypair(d / "ops", "vllm-audit/bench")
    log = TenantLog(d / "log", d / "ops.pub", d / "ops.key")
    n = args.records * 2
    pad = "lorem ipsum " * 50
    t0 = time.perf_counter()
    write_phases(
        log,
        [
            [rec(0, "globex")],
            [rec(i, "acme" if i % 2 else "globex", output_response=pad) for i in range(n)],
            [rec(0, "globex")],
        ],
        segment_max_bytes=64 * 1024 * 1024,
    )
    t_write = time.perf_counter() - t0
    config = load_config(None, {"log": {"dir": str(log.log_dir)}})
    t0 = time.perf_counter()
    res = build_bundle(
        config, "acme", log.t_from, log.t_to, d / "bundle", keys=load_public_keys([log.pub]), grace_seconds=0
    )
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = verify(read_bundle(str(d / "bundle")), load_keys([str(log.pub)]))
    t_verify = time.perf_counter() - t0
    assert not out["problems"], out["problems"][:3]
    print(
        json.dumps(
            {
                "records_exported": res.records,
                "log_entries": n + 2,
                "write_s": round(t_write, 2),
                "export_s": round(t_export, 2),
                "export_records_per_s": round(res.records / t_export),
                "bundle_bytes": res.bytes,
                "bundle_bytes_per_record": round(res.bytes / res.records),
                "verify_s": round(t_verify, 2),
                "verify_records_per_s": round(res.records / t_verify),
                "dir": str(d),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
