"""Every page renders in Chromium; with ``VLLM_AUDIT_CONSOLE_SCREENSHOTS=DIR`` the shots for docs/console.md go to DIR.

    VLLM_AUDIT_CONSOLE_SCREENSHOTS=docs/console .venv/bin/pytest tests/console/test_screenshots.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tests.console.conftest import Gateway


def test_screenshots_of_every_page(browser: Any, gateway: Gateway, tmp_path: Path) -> None:
    g = gateway
    out = Path(os.environ.get("VLLM_AUDIT_CONSOLE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US")
    ctx.set_default_timeout(10_000)
    try:
        page = ctx.new_page()
        page.goto(g.base + "/login")
        page.fill("#f-credential", "vak_000000000000_wrong")
        page.click("form.signin button[type=submit]")
        page.wait_for_selector("#signin-error")
        shots = {"signin": page.screenshot(path=out / "signin.png", full_page=True)}
        page.fill("#f-credential", g.people["erin"].key)
        page.click("form.signin button[type=submit]")
        page.wait_for_url(re.compile(r".*/search.*"))
        shots["search"] = page.screenshot(path=out / "search.png", full_page=True)
        page.goto(f"{g.base}/records/{g.records['alice'][-1]['record_id']}")
        page.wait_for_selector("#proof-status[data-result=verified]")
        shots["record"] = page.screenshot(path=out / "record.png", full_page=True)
        for name in ("integrity", "alerts", "usage", "export"):
            page.goto(f"{g.base}/{name}")
            shots[name] = page.screenshot(path=out / f"{name}.png", full_page=True)
        page.goto(f"{g.base}/alerts/{g.alerts['acme']}")
        shots["alert"] = page.screenshot(path=out / "alert.png", full_page=True)
        page.goto(f"{g.base}/lang?to=zh&next=/audit/console/search")
        shots["search-zh"] = page.screenshot(path=out / "search-zh.png", full_page=True)
        page.goto(f"{g.base}/lang?to=en&next=/audit/console/search")
        assert all(len(png) > 5000 for png in shots.values())
        assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in shots.values())
    finally:
        ctx.close()
