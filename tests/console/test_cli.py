"""``vllm-audit console``: the console alone, beside a server that runs the middleware (same log and store)."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx

from tests.console.conftest import Gateway, _free_port, wait_for


def test_the_console_command_serves_the_same_store_and_audits_into_its_own_chain(gateway: Gateway) -> None:
    g = gateway
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_audit.cli", "console", "--config", str(g.config), "--port", str(port)],
        cwd=g.dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/", timeout=2).status_code == 303, "vllm-audit console to start")
        with httpx.Client(base_url=url + "/audit/console", follow_redirects=False, timeout=10) as c:
            token = re.search(r'name="csrf" value="([0-9a-f]+)"', c.get("/login").text)
            assert token is not None
            r = c.post("/login", data={"credential": g.people["alice"].key, "csrf": token.group(1)})
            assert r.status_code == 303
            page = c.get("/search")
            assert page.status_code == 200
            for rec in g.records["alice"]:
                assert rec["record_id"] in page.text
            assert g.records["bob"][0]["record_id"] not in page.text
        # The audit API is served too, with the same identities.
        api = httpx.get(url + "/audit/v1/whoami", headers={"authorization": f"Bearer {g.people['dave'].key}"})
        assert api.status_code == 200 and api.json()["audit_role"] == "org_auditor"
        gateway_writers = {r["writer_id"] for recs in g.records.values() for r in recs}

        def own_chain() -> list[str]:
            return [
                str(e["writer_id"])
                for e in g.events(endpoint="console.search")
                if e.get("writer_id") not in gateway_writers and e["actor"]["user_id"] == "alice"
            ]

        assert wait_for(own_chain, "the console's own chain to hold its search event")
    finally:
        proc.terminate()
        proc.wait(20)
