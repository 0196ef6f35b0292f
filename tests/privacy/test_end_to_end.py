from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.slow

EMAIL = "zhang.san@example.com"
RAW = ["11010519491231002X", "13812345678", EMAIL, "6212345678901232", "4111111111111111"]
PROMPTS = [
    f"我的身份证号是{RAW[0]}，手机{RAW[1]}，邮箱{EMAIL}",
    f"卡号{RAW[3]}，信用卡 {RAW[4]}，请联系{EMAIL}",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_audit.cli", *args], capture_output=True, text=True, timeout=60)


def _post(port: int, body: dict[str, Any], rid: str) -> bytes:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-request-id": rid},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return bytes(resp.read())


def _records(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(log_dir.glob("writers/*/seg-*.jsonl")):
        out += [orjson.loads(line) for line in seg.read_bytes().splitlines() if line.strip()]
    return [r for r in out if r.get("record_type") == "inference"]


def test_gateway_end_to_end_redaction_decrypt_erase_verify(tmp_path: Path) -> None:
    """Corpus through `vllm-audit serve`: no raw PII on disk, pseudonyms match, decrypt, erase, verify."""
    port = _free_port()
    log_dir = tmp_path / "log"
    conf = tmp_path / "audit.toml"
    conf.write_text(
        f'[log]\ndir = "{log_dir}"\n[gateway]\nport = {port}\n'
        '[privacy]\nkey_file = "keys/master.json"\n'
        '[privacy.default.entities]\nEMAIL = "pseudonym"\n'
        '[privacy.default.fields.input_prompt]\nmode = "encrypt"\n'
        '[privacy.default.fields.client_ip]\nmode = "pseudonym"\n'
    )
    assert _cli("privacy-keygen", "--config", str(conf)).returncode == 0
    assert _cli("keygen", "--out", str(tmp_path / "sign")).returncode == 0
    with conf.open("a") as fh:
        fh.write(f'[integrity]\nsigning_key = "{tmp_path / "sign.key"}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_audit.cli", "serve", "--config", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/audit/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("gateway did not start") from None
                time.sleep(0.2)
        for i, prompt in enumerate(PROMPTS):
            msgs = [{"role": "user", "content": prompt}]
            _post(port, {"model": "demo-model", "messages": msgs, "max_tokens": 64}, f"e2e-{i}")
            body = _post(port, {"model": "demo-model", "messages": msgs, "max_tokens": 64, "stream": True}, f"e2e-s{i}")
            assert b"data:" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    records = {r["request_id"]: r for r in _records(log_dir)}
    assert set(records) >= {"e2e-0", "e2e-s0", "e2e-1", "e2e-s1"}
    blob = b"".join(p.read_bytes() for p in log_dir.rglob("*") if p.is_file())
    for value in RAW:
        assert value.encode() not in blob, value
    # The demo engine echoes the prompt: the e-mail's pseudonym is the same in prompts and outputs.
    tokens = {tok for r in records.values() for tok in _pseudonyms(r)}
    assert len(tokens) == 1
    assert records["e2e-0"]["client_ip"].startswith("ps_")

    got = _cli("decrypt", "--config", str(conf), "--request-id", "e2e-0", "--auditor", "carol")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)[0]["content"] == PROMPTS[0]
    assert _cli("erase", "--config", str(conf), "--org", records["e2e-0"]["org_id"]).returncode == 0
    after = _cli("decrypt", "--config", str(conf), "--request-id", "e2e-0")
    assert after.returncode == 2 and "erased" in after.stderr
    verify = _cli("verify", str(log_dir), "--public-key", str(tmp_path / "sign.pub"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _pseudonyms(record: dict[str, Any]) -> list[str]:
    text = orjson.dumps([record.get("input_prompt"), record.get("output_response")]).decode()
    out, i = [], text.find("<EMAIL:ps_")
    while i >= 0:
        out.append(text[i : text.index(">", i) + 1])
        i = text.find("<EMAIL:ps_", i + 1)
    return out
