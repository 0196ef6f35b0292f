"""Archive benchmark: upload sealed segments to S3 with Object Lock, prune them, restore them back.

One command: ``.venv/bin/python bench/archive/run.py [--records N] [--segment-mb M]``. It starts
LocalStack-core (scripts/services.d/localstack.sh) on a free port, writes N ~1 KB records through
the real Chain (segments of M MB, a signed checkpoint every 1,000 records), archives every sealed
segment (three locked objects each, full read-back), prunes them past retention, and restores the
whole pruned range with ``vllm-audit archive restore``'s code path (every object hashed against
the index and its manifest, every entry link-checked, the tree rebuilt against every manifest and
every checkpoint, each checkpoint's signature verified). Prints JSON: wall seconds, CPU seconds of
this process (LocalStack runs in its own process), MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.archive.conftest import localstack
from tests.export.conftest import rec

from vllm_audit.archive.projection import SegmentArchiver
from vllm_audit.archive.prune import execute, plan
from vllm_audit.archive.restore import restore
from vllm_audit.archive.s3 import ObjectStore
from vllm_audit.config import load_config
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.reader import LogReader


def _timed() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--segment-mb", type=float, default=2.0)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="vllm-audit-bench-archive-"))
    (d / "ls").mkdir()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    write_keypair(d / "ops", "vllm-audit/bench")
    seg_bytes = int(args.segment_mb * 1024 * 1024)
    with localstack(d / "ls") as url:
        config = load_config(
            None,
            {
                "log": {"dir": str(d / "log")},
                "integrity": {"signing_key": str(d / "ops.key"), "segment_max_bytes": seg_bytes},
                "retention": {"days": 0},
                "archive": {
                    "bucket": "bench-archive",
                    "endpoint_url": url,
                    "addressing_style": "path",
                    "create_bucket": True,
                    "retain_days": 1,
                },
            },
        )
        chain = Chain(config.log.dir, IntegrityConfig(signing_key=str(d / "ops.key"), segment_max_bytes=seg_bytes))
        pad = "lorem ipsum " * 60
        for k in range(0, args.records, 1000):
            batch = [rec(i, "acme" if i % 2 else "globex", output_response=pad) for i in range(k, k + 1000)]
            chain.append([*chain.pending_events(), *batch])
            chain.sync()
            chain.after_commit()
            chain.checkpoint()
        chain.close()
        (wid,) = LogReader(config.log.dir).writer_ids()
        store = ObjectStore(config.archive)
        store.ensure_bucket()
        w0, c0 = _timed()
        archived = SegmentArchiver(config, d / "log" / "ship", store).archive_until(wid, 1 << 40)
        w1, c1 = _timed()
        detail = execute(config, plan(config), reason="bench")
        w2, c2 = _timed()
        res = restore(config, wid, 0, None, d / "restored", store=store, keys=load_public_keys([d / "ops.pub"]))
        w3, c3 = _timed()
    mb = res.archive_bytes / 1e6
    print(
        json.dumps(
            {
                "records": args.records,
                "segments_archived": archived,
                "segments_restored": len(res.segments),
                "entries_restored": res.entries,
                "pruned_entries": detail["entries"],
                "checkpoints_checked": res.checkpoints,
                "restored_mb": round(mb, 1),
                "archive_wall_s": round(w1 - w0, 2),
                "archive_cpu_s": round(c1 - c0, 2),
                "archive_mb_s": round(mb / (w1 - w0), 1),
                "prune_wall_s": round(w2 - w1, 2),
                "restore_wall_s": round(w3 - w2, 2),
                "restore_cpu_s": round(c3 - c2, 2),
                "restore_mb_s": round(mb / (w3 - w2), 1),
                "restore_cpu_us_per_entry": round((c3 - c2) / max(1, res.entries) * 1e6, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
