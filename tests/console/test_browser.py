"""The console in Debian's Chromium (Playwright), against a gateway subprocess over real PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.console.conftest import Gateway, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def ctx(browser: Any) -> Iterator[Any]:
    c = browser.new_context(locale="en-US")
    c.set_default_timeout(10_000)
    try:
        yield c
    finally:
        c.close()


def sign_in(ctx: Any, g: Gateway, who: str) -> Any:
    page = ctx.new_page()
    page.goto(g.base + "/login")
    page.fill("#f-credential", g.people[who].key)
    page.click("form.signin button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/search.*"))
    return page


def listed(page: Any) -> set[str]:
    hrefs = page.eval_on_selector_all("table.results tbody tr td:first-child a", "els => els.map(e => e.href)")
    return {h.rsplit("/", 1)[-1] for h in hrefs}


def keys(recs: list[dict[str, Any]]) -> set[str]:
    return {r["record_id"] for r in recs}


def test_a_user_sees_only_their_own_records_and_cannot_reach_others_by_url(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "alice")
    assert listed(page) == keys(g.records["alice"])
    assert "alice @ acme" in page.inner_text("header")
    for other in ("bob", "carol"):
        rid = g.records[other][0]["record_id"]
        resp = page.goto(f"{g.base}/records/{rid}")
        assert resp is not None and resp.status == 404
        assert g.records[other][0]["input_prompt"][0]["content"] not in page.content()
    # Filtering by someone else's user id does not widen the view.
    page.goto(f"{g.base}/search?user_id=bob")
    assert listed(page) == set()
    for path in ("integrity", "alerts", "export"):
        resp = page.goto(f"{g.base}/{path}")
        assert resp is not None and resp.status == 403


def test_a_tenant_auditor_sees_their_org_only(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "dave")
    assert listed(page) == keys(g.records["alice"]) | keys(g.records["bob"])
    page.goto(f"{g.base}/search?org_id=globex")
    assert listed(page) == set()
    resp = page.goto(f"{g.base}/records/{g.records['carol'][0]['record_id']}")
    assert resp is not None and resp.status == 404
    page.goto(f"{g.base}/alerts")
    text = page.inner_text("main")
    assert "acme" in text and "globex" not in text
    resp = page.goto(f"{g.base}/alerts/{g.alerts['globex']}")
    assert resp is not None and resp.status == 404


def test_a_platform_admin_sees_everything(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "erin")
    everyone = keys(g.api("erin", "records", limit="500")["records"])  # the audit API's view of an admin
    assert keys(g.records["alice"]) | keys(g.records["carol"]) <= everyone
    assert listed(page) == everyone
    page.goto(f"{g.base}/search?org_id=globex")
    assert listed(page) == keys(g.records["carol"])
    page.goto(f"{g.base}/alerts")
    text = page.inner_text("main")
    assert "acme" in text and "globex" in text
    page.goto(f"{g.base}/integrity")
    rows = page.locator("table.writers tbody tr")
    assert rows.count() >= 1
    assert "yes" in rows.first.inner_text()


def test_search_filters_sort_and_pages(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "erin")
    page.select_option("#f-sort", "total_tokens")
    page.select_option("#f-dir", "asc")
    page.select_option("#f-limit", "25")
    page.fill("#f-org_id", "acme")
    page.click("form.filters button[type=submit]")
    page.wait_for_url(re.compile(r".*org_id=acme.*"))
    assert listed(page) == keys(g.records["alice"]) | keys(g.records["bob"])
    tokens = [
        int(x)
        for x in page.eval_on_selector_all("table.results tbody tr td:nth-child(8)", "e=>e.map(x=>x.textContent)")
    ]
    assert tokens == sorted(tokens)
    # Paging: one record per page walks through all of them, each once.
    rid = g.records["alice"][0]["request_id"]
    page.goto(f"{g.base}/search?request_id={rid}")
    assert listed(page) == {g.records["alice"][0]["record_id"]}
    page.goto(f"{g.base}/search?limit=1&org_id=acme")
    seen: list[str] = []
    for _ in range(10):
        seen += sorted(listed(page))
        nxt = page.locator("a[rel=next]")
        if nxt.count() == 0:
            break
        nxt.click()
        page.wait_for_load_state()
    assert sorted(seen) == sorted(keys(g.records["alice"]) | keys(g.records["bob"]))
    resp = page.goto(f"{g.base}/search?prompt_sha256=nothex")
    assert resp is not None and resp.status == 400
    assert "prompt hash" in page.inner_text("main")


def open_record(ctx: Any, g: Gateway, who: str = "alice") -> Any:
    page = sign_in(ctx, g, who)
    rid = g.records[who][-1]["record_id"]
    page.goto(f"{g.base}/records/{rid}")
    page.wait_for_function("document.getElementById('proof-status').dataset.result !== undefined")
    return page


def test_a_records_proof_verifies_in_the_browser(ctx: Any, gateway: Gateway) -> None:
    page = open_record(ctx, gateway)
    assert page.get_attribute("#proof-status", "data-result") == "verified"
    steps = page.eval_on_selector_all("#proof-steps li", "e => e.map(x => x.dataset.result)")
    assert steps == ["ok"] * 5
    assert "vllm-audit/" in page.inner_text("#checkpoint")


def _tamper(ctx: Any, change: Any) -> None:
    """Rewrite the proof data block of record pages on the way to the browser."""

    def handle(route: Any) -> None:
        resp = route.fetch()
        body = resp.text()
        m = re.search(r'(<script type="application/json" id="proof-data">)(.*?)(</script>)', body, re.S)
        assert m is not None
        data = orjson.loads(m.group(2))
        change(data)
        new = orjson.dumps(data).decode().replace("<", "\\u003c")
        route.fulfill(response=resp, body=body[: m.start(2)] + new + body[m.end(2) :])

    ctx.route(re.compile(r".*/console/records/.*"), handle)


@pytest.mark.parametrize(
    "what",
    ["record_line", "path", "checkpoint_root", "signature"],
)
def test_a_tampered_proof_shows_as_failed(ctx: Any, gateway: Gateway, what: str) -> None:
    def change(data: dict[str, Any]) -> None:
        p = data["proof"]
        if what == "record_line":  # the stored line edited (and the fields shown with it)
            p["record"] = p["record"].replace('"status":"ok"', '"status":"client_error"')
            data["record"]["status"] = "client_error"
        elif what == "path":
            h = p["inclusion_proof"][0] if p["inclusion_proof"] else p["leaf_hash"]
            flipped = ("0" if h[0] != "0" else "1") + h[1:]
            if p["inclusion_proof"]:
                p["inclusion_proof"][0] = flipped
            else:
                p["leaf_hash"] = flipped
        elif what == "checkpoint_root":  # a different size in the note: the signature no longer covers it
            lines = p["checkpoint"].split("\n")
            lines[1] = str(int(lines[1]) + 1)
            p["checkpoint"] = "\n".join(lines)
            p["tree_size"] += 1
        else:
            note = p["checkpoint"]
            head, sig = note.rstrip("\n").rsplit(" ", 1)
            sig = ("A" if sig[10] != "A" else "B").join([sig[:10], sig[11:]])
            p["checkpoint"] = f"{head} {sig}\n"

    _tamper(ctx, change)
    page = open_record(ctx, gateway)
    assert page.get_attribute("#proof-status", "data-result") == "failed"
    assert "FAILED" in page.inner_text("#proof-status")
    assert "fail" in page.eval_on_selector_all("#proof-steps li", "e => e.map(x => x.dataset.result)")


def test_without_ed25519_in_webcrypto_the_signature_is_verified_by_the_server_only(ctx: Any, gateway: Gateway) -> None:
    ctx.add_init_script(
        """
        const orig = crypto.subtle.importKey.bind(crypto.subtle);
        crypto.subtle.importKey = (fmt, data, alg, ...rest) =>
          (alg && (alg === 'Ed25519' || alg.name === 'Ed25519'))
            ? Promise.reject(new DOMException('no Ed25519', 'NotSupportedError'))
            : orig(fmt, data, alg, ...rest);
        """
    )
    page = open_record(ctx, gateway)
    assert page.get_attribute("#proof-status", "data-result") == "server-only"
    assert "server only" in page.inner_text("#proof-status")
    steps = page.eval_on_selector_all("#proof-steps li", "e => e.map(x => x.dataset.result)")
    assert steps == ["ok", "ok", "ok", "ok", "server-only"]
    assert page.inner_text("#server-result").startswith("ok")


def test_usage_charts_render(ctx: Any, browser: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "erin")
    page.goto(f"{g.base}/usage?group=user_id")
    users = {r["user_id"] for r in g.api("erin", "records", limit="500")["records"]}
    assert {"alice", "bob", "carol"} <= users
    for chart in ("chart-calls", "chart-tokens", "chart-latency"):
        assert page.locator(f"svg#{chart} g.series").count() == len(users)
        assert page.locator(f"svg#{chart} circle").count() >= len(users)
        box = page.locator(f"svg#{chart}").bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 50
    series = page.eval_on_selector_all("svg#chart-calls g.series", "e => e.map(x => x.dataset.series)")
    assert set(series) == users
    # A user's usage is their own only.
    other = browser.new_context()
    try:
        page2 = sign_in(other, g, "bob")
        page2.goto(f"{g.base}/usage?group=user_id")
        assert page2.eval_on_selector_all("svg#chart-calls g.series", "e => e.map(x => x.dataset.series)") == ["bob"]
    finally:
        other.close()


def test_acknowledging_an_alert_is_an_audited_event(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "dave")
    aid = g.alerts["acme"]
    page.goto(f"{g.base}/alerts/{aid}")
    triggers = page.eval_on_selector_all("#triggers a", "e => e.map(x => x.href)")
    assert {h.rsplit("/", 1)[-1] for h in triggers} == keys(g.records["alice"])
    page.click("#ack")
    page.wait_for_url(re.compile(rf".*/alerts/{aid}$"))
    assert "acknowledged" in page.inner_text("#ack-state")
    assert "dave" in page.inner_text("#ack-state")
    acks = wait_for(lambda: g.events(event="alert_acknowledged", alert_id=aid), "the acknowledgement event")
    assert acks[0]["actor"]["user_id"] == "dave" and acks[0]["outcome"] == "ok"


def test_every_view_search_and_export_leaves_an_audit_event(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = sign_in(ctx, g, "erin")
    rid = g.records["carol"][0]["record_id"]
    page.goto(f"{g.base}/search?model=demo-model&sort=latency_ms")
    page.goto(f"{g.base}/records/{rid}")
    page.goto(f"{g.base}/integrity")
    page.goto(f"{g.base}/alerts")
    page.goto(f"{g.base}/usage")
    page.goto(f"{g.base}/export")
    page.fill("#f-org_id", "globex")
    page.click("form.filters button[type=submit]")
    page.wait_for_selector("#export-state.ok")
    expect = {
        "console.search": "console_search",
        "console.record": "console_read",
        "console.integrity": "console_read",
        "console.alerts": "console_read",
        "console.usage": "console_read",
        "console.export": "console_export",
    }

    def mine() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for e in g.events():
            if (e.get("actor") or {}).get("user_id") == "erin" and str(e.get("endpoint", "")).startswith("console"):
                out.setdefault(e["endpoint"], []).append(e)
        return out

    events = wait_for(lambda: (m := mine()) and all(k in m for k in expect) and m, "the console's events")
    for endpoint, kind in expect.items():
        assert any(e["event"] == kind and e["audit_role"] == "platform_admin" for e in events[endpoint]), endpoint
    assert any(e["query"].get("model") == "demo-model" for e in events["console.search"])
    assert any(rid in e["result_ids"] for e in events["console.record"])
    exp = [e for e in events["console.export"] if e["event"] == "console_export"]
    assert exp[-1]["export"]["records"] >= len(g.records["carol"])  # the export counts its alert entry too
    signins = g.events(event="console_sign_in", outcome="ok")
    assert any(e["actor"]["user_id"] == "erin" for e in signins)


def test_a_revoked_key_ends_the_session_at_once(ctx: Any, gateway: Gateway) -> None:
    from vllm_audit.access.apikeys import KeyStore

    g = gateway
    ks = KeyStore(g.dir / "keys.json")
    key, entry = ks.add("frank", "acme", (), None, "revoked in a test")
    page = ctx.new_page()
    page.goto(g.base + "/login")
    page.fill("#f-credential", key)
    page.click("form.signin button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/search.*"))
    ks.revoke(entry.key_id)
    page.goto(g.base + "/search")
    assert page.url.endswith("/console/login")


def test_sign_in_failure_is_shown_and_audited(ctx: Any, gateway: Gateway) -> None:
    g = gateway
    page = ctx.new_page()
    page.goto(g.base + "/login")
    page.fill("#f-credential", "vak_000000000000_not-a-real-key")
    page.click("form.signin button[type=submit]")
    page.wait_for_selector("#signin-error")
    assert "Sign-in failed" in page.inner_text("#signin-error")
    assert wait_for(lambda: g.events(event="console_sign_in", outcome="unauthenticated"), "the failed sign-in event")


def test_cookies_csp_and_csrf(gateway: Gateway) -> None:
    g = gateway
    with httpx.Client(base_url=g.url, follow_redirects=False) as c:
        r = c.get("/audit/console/login")
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in r.text and " style=" not in r.text
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text)
        assert token is not None
        # No token (or another origin): refused.
        r2 = c.post("/audit/console/login", data={"credential": g.people["erin"].key})
        assert r2.status_code == 403
        r3 = c.post(
            "/audit/console/login",
            data={"credential": g.people["erin"].key, "csrf": token.group(1)},
            headers={"origin": "http://evil.example"},
        )
        assert r3.status_code == 403
        r4 = c.post(
            "/audit/console/login",
            data={"credential": g.people["erin"].key, "csrf": token.group(1)},
            headers={"origin": g.url},
        )
        assert r4.status_code == 303
        cookie = next(
            v for k, v in r4.headers.multi_items() if k == "set-cookie" and v.startswith("vllm_audit_console=")
        )
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # plain HTTP here
        page = c.get("/audit/console/alerts")
        assert page.status_code == 200
        # A signed-in POST without the form's token is refused, and nothing is acknowledged.
        r5 = c.post(f"/audit/console/alerts/{g.alerts['globex']}/ack", data={}, headers={"origin": g.url})
        assert r5.status_code == 403
        assert not g.events(event="alert_acknowledged", alert_id=g.alerts["globex"], outcome="ok")
        # A forged cookie is no session.
        forged = httpx.get(g.base + "/search", headers={"cookie": "vllm_audit_console=" + "x" * 40})
        assert forged.status_code == 303 and forged.headers["location"].endswith("/console/login")


def test_chinese_by_accept_language_and_by_the_switch(browser: Any, gateway: Gateway) -> None:
    g = gateway
    ctx = browser.new_context(locale="zh-CN", extra_http_headers={"accept-language": "zh-CN,zh;q=0.9,en;q=0.5"})
    try:
        page = ctx.new_page()
        page.goto(g.base + "/login")
        assert page.inner_text("h1") == "登录"
        assert page.get_attribute("html", "lang") == "zh-Hans"
        page.click("a.lang")
        assert page.inner_text("h1") == "Sign in"
        page.click("a.lang")
        assert page.inner_text("h1") == "登录"
    finally:
        ctx.close()


def test_keyboard_only_sign_in_and_navigation_at_200_percent(browser: Any, gateway: Gateway) -> None:
    g = gateway
    ctx = browser.new_context(viewport={"width": 640, "height": 800}, device_scale_factor=2)
    try:
        page = ctx.new_page()
        page.goto(g.base + "/login")
        page.keyboard.press("Tab")  # the skip link comes first
        assert page.evaluate("document.activeElement.className") == "skip"
        page.focus("#f-credential")
        page.keyboard.type(g.people["erin"].key)
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r".*/console/search.*"))
        # Tab reaches every main navigation link.
        reached = set()
        for _ in range(12):
            page.keyboard.press("Tab")
            reached.add(page.evaluate("document.activeElement.textContent"))
        assert {"Search", "Integrity", "Alerts", "Usage", "Export"} <= reached
        # 640 CSS px wide at 2x is a 1280 px window zoomed to 200 %: no page-wide horizontal scroll.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        ctx.close()
