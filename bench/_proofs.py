"""Inclusion proofs verified per second per core, through the package's public proof API.

    .venv/bin/python bench/_proofs.py [RECORDS] [PROOFS]

Writes RECORDS (default 5,000) ~1 KB inference records with the real ``Chain`` (signed
checkpoints every 1,000 entries, as configured by default), builds PROOFS (default 300) inclusion
proofs with ``build_inclusion_proof`` for records spread over the log (given their writer and seq,
as the audit store knows them), then times
``verify_inclusion_proof`` over all of them in one process (CPU time, ``time.process_time``, so
other load on the machine does not inflate it). Every verification does everything an outside
verifier does: parse and check the signed checkpoint note (Ed25519 signature), re-hash the record,
check its header, and walk the RFC 6962 path to the signed root. The Merkle part alone
(``verify_inclusion``, no note, no signature) is timed too, to show which part dominates.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.merkle import verify_inclusion
from vllm_audit.integrity.proofs import build_inclusion_proof, verify_inclusion_proof
from vllm_audit.integrity.reader import LogReader

sys.path.insert(0, str(Path(__file__).resolve().parent / "verify"))
from run import make_record


def main() -> None:
    n_records = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    n_proofs = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    base = Path(tempfile.mkdtemp(prefix="vllm-audit-proofs-"))
    try:
        key = base / "bench"
        write_keypair(key, "bench/key")
        chain = Chain(base / "log", IntegrityConfig(signing_key=f"{key}.key"))
        batch = 256
        written = 0
        while written < n_records:
            n = min(batch, n_records - written)
            chain.append(chain.pending_events() + [make_record(written + i, 1000) for i in range(n)])
            chain.sync()
            chain.after_commit()
            written += n
        chain.close()  # signs a final checkpoint: every record is covered
        keys = load_public_keys([f"{key}.pub"])
        rng = random.Random(7)
        picks = set(rng.sample(range(n_records), min(n_proofs, n_records)))
        reader = LogReader(base / "log", limit="all")
        located = []  # (request id, writer, seq) of the picked records, as the audit store knows them
        for wid in reader.writer_ids():
            i = 0
            for entry in reader.entries_all(wid):
                if entry.record_type == "inference":
                    if i in picks:
                        located.append((f"0197b5a4-7c3e-7000-8000-{i:012x}", wid, entry.seq))
                    i += 1
        t = time.process_time()
        proofs = []
        for rid, wid, seq in located:
            proof = build_inclusion_proof(base / "log", rid, writer_id=wid, seq=seq)
            assert proof is not None, rid
            proofs.append(proof)
        build_s = time.process_time() - t

        def full() -> float:
            t0 = time.process_time()
            for p in proofs:
                verify_inclusion_proof(p, keys)
            return time.process_time() - t0

        merkle_args = [
            (
                p["leaf_index"],
                p["tree_size"],
                bytes.fromhex(p["leaf_hash"]),
                [bytes.fromhex(h) for h in p["inclusion_proof"]],
                verify_inclusion_proof(p, keys).root,
            )
            for p in proofs
        ]

        def merkle() -> float:
            t0 = time.process_time()
            for index, size, leaf, path, root in merkle_args:
                verify_inclusion(index, size, leaf, path, root)
            return time.process_time() - t0

        full_s = min(full() for _ in range(5))  # each round verifies every proof from scratch
        merkle_s = min(merkle() for _ in range(3))
        print(
            json.dumps(
                {
                    "records": n_records,
                    "proofs": len(proofs),
                    "mean_path_len": round(sum(len(p["inclusion_proof"]) for p in proofs) / len(proofs), 1),
                    "build_ms_per_proof": round(build_s / len(proofs) * 1000, 3),
                    "verify_us_per_proof": round(full_s / len(proofs) * 1e6, 2),
                    "verify_proofs_per_s_per_core": round(len(proofs) / full_s),
                    "merkle_only_us_per_proof": round(merkle_s / len(proofs) * 1e6, 2),
                    "merkle_only_per_s_per_core": round(len(proofs) / merkle_s),
                    "load_average": os.getloadavg()[0],
                }
            )
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
