"""The auditor's console: a pure ASGI app of server-rendered pages under ``{ops_prefix}/console``.

Request flow for every page: open the session cookie → authenticate its credential with the
audit API's authenticator (so a revoked key stops at once) → the viewer (role, org, user) exactly
as the audit API derives it → read through the query store *as that viewer* → write this view's
audit event and wait until it is durable (if it cannot be written the page is not shown: 503) →
send the page with a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.resources
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from vllm_audit._asgi import BodyError, lifespan, read_body
from vllm_audit.access.api import AuditApi
from vllm_audit.access.apikeys import iso, utcnow
from vllm_audit.access.auth import Authenticator
from vllm_audit.access.identity import Identity, identity_from_scope
from vllm_audit.access.store import BadQuery, Viewer
from vllm_audit.config import Config
from vllm_audit.console import pages
from vllm_audit.console.html import Page, layout
from vllm_audit.console.i18n import pick_lang, t
from vllm_audit.console.logview import ACK_EVENT, AlertIndex, trusted_keys
from vllm_audit.console.queries import ensure_indexes
from vllm_audit.console.session import (
    KEY_FILE,
    LANG_COOKIE,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Sessions,
    load_or_create_key,
    new_nonce,
)
from vllm_audit.ship.config import state_dir
from vllm_audit.types import Receive, Scope, Send

log = logging.getLogger(__name__)

SubmitEvent = Callable[[dict[str, Any]], "Awaitable[None] | None"]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
MAX_FORM = 64 * 1024
STATIC = {"console.js": b"text/javascript; charset=utf-8", "console.css": b"text/css; charset=utf-8"}


class Refused(Exception):
    """End the request with an error page (status, message key or text)."""

    def __init__(self, status: int, key: str, detail: str = "") -> None:
        super().__init__(key)
        self.status, self.key, self.detail = status, key, detail


@dataclass(slots=True)
class View:
    """One console request being served: who, which page, and what goes into its audit event."""

    scope: Scope
    lang: str
    ident: Identity | None = None
    viewer: Viewer | None = None
    nonce: str = ""
    endpoint: str = "console"
    event: str = "console_read"
    query: dict[str, Any] = field(default_factory=dict)
    result_ids: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    audited: bool = True
    set_cookies: list[str] = field(default_factory=list)
    #: Runs once the view's audit event is durable (e.g. an acknowledgement shown at once).
    after_audit: Callable[[], None] | None = None

    def need_viewer(self) -> Viewer:
        if self.viewer is None:
            raise Refused(401, "signin")
        return self.viewer


class Console:
    """The console ASGI app; mount it at ``{edge.ops_prefix}/console`` (the middleware does)."""

    def __init__(self, config: Config, submit_event: SubmitEvent, api: AuditApi | None = None) -> None:
        self.config = config
        self.base = config.edge.ops_prefix.rstrip("/") + "/console"
        self.submit_event = submit_event
        self.api = api if api is not None else AuditApi(config, submit_event)
        self.store = self.api.store
        self.log_dir = Path(config.log.dir)
        self.state = state_dir(config.ship, config.log.dir)
        self.authenticator = Authenticator(config) if config.access.auth not in ("none",) else None
        self.sessions = Sessions(load_or_create_key(self.log_dir / "keys" / KEY_FILE))
        self.alerts = AlertIndex(self.log_dir)
        self.keys = trusted_keys(config)
        self._static = {name: _read_static(name) for name in STATIC}
        self._indexing: threading.Thread | None = None

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = str(scope.get("path", ""))
        sub = path[len(self.base) :] if path.startswith(self.base) else path
        parts = [unquote(p) for p in sub.strip("/").split("/") if p]
        method = str(scope.get("method", "GET"))
        if parts[:1] == ["static"] and len(parts) == 2:
            await self._send_static(send, parts[1])
            return
        cookies = _cookies(scope)
        view = View(scope, pick_lang(cookies.get(LANG_COOKIE), _header(scope, b"accept-language")))
        try:
            body: str | None = None
            status = 200
            redirect = ""
            try:
                await self._identify(view, cookies)
                result = await self._route(view, method, parts, cookies, receive)
                if isinstance(result, str):
                    redirect = result
                    status = 303
                else:
                    status = result.status
                    body = self._render(view, result)
            except Refused as exc:
                status, redirect, body = await self._refused(view, exc)
            except BadQuery as exc:
                status, body = 400, self._render(view, pages.error(view.lang, 400, str(exc)))
            if view.audited:
                await self._audit(view, status)
                if view.after_audit is not None and status < 400:
                    view.after_audit()
        except Refused as exc:  # the audit event could not be written: show nothing read
            status, redirect, body = 503, "", self._render(view, pages.error(view.lang, 503, ""))
            view.set_cookies.clear()
            log.error("console view not recorded: %s", exc.detail)
        except Exception:
            log.exception("console error")
            status, redirect, body = 500, "", self._render(view, pages.error(view.lang, 500, "internal error"))
        await self._send(send, status, body, redirect, view)

    async def _refused(self, view: View, exc: Refused) -> tuple[int, str, str | None]:
        if exc.status == 401:
            view.audited = view.audited and view.endpoint != "console"
            return 303, self.base + "/login", None
        return exc.status, "", self._render(view, pages.error(view.lang, exc.status, exc.detail, key=exc.key))

    # -- identity -----------------------------------------------------------------------------

    async def _identify(self, view: View, cookies: Mapping[str, str]) -> None:
        scoped = identity_from_scope(view.scope)
        if self.config.access.auth == "trusted_header":
            ident = scoped if scoped is not None else await self._authenticate_scope(view.scope)
            view.ident, view.nonce = ident, "trusted-header:" + ident.user_id
        else:
            session = self.sessions.open(cookies.get(SESSION_COOKIE))
            if session is None:
                return
            view.ident = await self._authenticate(session.credential)
            view.nonce = session.nonce
        if view.ident is not None and view.ident.ok:
            view.viewer = self.api.viewer_of(view.ident)

    async def _authenticate(self, credential: str) -> Identity:
        if self.authenticator is None:
            return Identity.failed("none", "the console needs [access] auth")
        scope = {"type": "http", "headers": [(b"authorization", b"Bearer " + credential.encode("latin-1", "replace"))]}
        return await self.authenticator.authenticate(scope)

    async def _authenticate_scope(self, scope: Scope) -> Identity:
        if self.authenticator is None:
            return Identity.failed("none", "the console needs [access] auth")
        return await self.authenticator.authenticate(scope)

    def csrf(self, view: View) -> str:
        return self.sessions.csrf_token(view.nonce) if view.nonce else ""

    def _check_post(self, view: View, form: Mapping[str, str], nonce: str) -> None:
        if not _same_origin(view.scope) or not self.sessions.csrf_ok(nonce, form.get("csrf")):
            view.endpoint = view.endpoint or "console"
            raise Refused(403, "error.csrf")

    # -- routing ------------------------------------------------------------------------------

    async def _route(
        self, view: View, method: str, parts: list[str], cookies: Mapping[str, str], receive: Receive
    ) -> Page | str:
        if not parts:
            view.audited = False
            return self.base + "/search"
        head = parts[0]
        if head == "lang" and len(parts) == 1:
            view.audited = False
            params = _query(view.scope)
            to = params.get("to", "en")
            nxt = params.get("next", "")
            if to in ("en", "zh"):
                view.set_cookies.append(_cookie(LANG_COOKIE, to, self.base, view.scope, max_age=31536000))
            return (
                nxt
                if nxt.startswith(self.base + "/") and "//" not in nxt and "\\" not in nxt
                else self.base + "/search"
            )
        if head == "login" and len(parts) == 1:
            return await self._login(view, method, cookies, receive)
        if head == "logout" and len(parts) == 1:
            _allow(method, "POST")
            view.endpoint, view.event = "console.logout", "console_sign_out"
            form = await _form(receive)
            if view.nonce:
                self._check_post(view, form, view.nonce)
            else:
                view.audited = False
            view.set_cookies.append(_cookie(SESSION_COOKIE, "", self.base, view.scope, max_age=0))
            return self.base + "/login"
        view.endpoint = "console." + head
        viewer = view.need_viewer()
        if head == "search" and len(parts) == 1:
            _allow(method, "GET")
            view.event = "console_search"
            return await pages.search(self, view, viewer, _query(view.scope))
        if head == "records" and len(parts) == 2:
            _allow(method, "GET")
            view.endpoint = "console.record"
            return await pages.record(self, view, viewer, parts[1])
        if head == "integrity" and len(parts) == 1:
            _allow(method, "GET")
            return await pages.integrity(self, view, viewer)
        if head == "integrity" and parts[1:] == ["verify"]:
            _allow(method, "POST")
            view.endpoint, view.event = "console.verify", "console_verify"
            self._check_post(view, await _form(receive), view.nonce)
            return await pages.run_verify(self, view, viewer)
        if head == "alerts" and len(parts) == 1:
            _allow(method, "GET")
            return await pages.alerts(self, view, viewer)
        if head == "alerts" and len(parts) == 2:
            _allow(method, "GET")
            view.endpoint = "console.alert"
            return await pages.alert(self, view, viewer, parts[1])
        if head == "alerts" and len(parts) == 3 and parts[2] == "ack":
            _allow(method, "POST")
            view.endpoint, view.event = "console.alert.ack", ACK_EVENT
            self._check_post(view, await _form(receive), view.nonce)
            return await pages.ack(self, view, viewer, parts[1])
        if head == "usage" and len(parts) == 1:
            _allow(method, "GET")
            return await pages.usage(self, view, viewer, _query(view.scope))
        if head == "export" and len(parts) == 1:
            if method == "POST":
                view.event = "console_export"
                form = await _form(receive)
                self._check_post(view, form, view.nonce)
                return await pages.start_export(self, view, viewer, form)
            _allow(method, "GET")
            return await pages.export(self, view, viewer)
        raise Refused(404, "error.404")

    async def _login(self, view: View, method: str, cookies: Mapping[str, str], receive: Receive) -> Page | str:
        view.endpoint = "console.login"
        if method == "GET":
            view.audited = False
            if view.viewer is not None:
                return self.base + "/search"
            nonce = new_nonce()
            view.set_cookies.append(_cookie(LOGIN_COOKIE, nonce, self.base, view.scope, max_age=3600))
            return pages.login(self, view, self.sessions.csrf_token(nonce), "")
        _allow(method, "POST")
        view.event = "console_sign_in"
        form = await _form(receive)
        self._check_post(view, form, cookies.get(LOGIN_COOKIE, ""))
        cred = (form.get("credential") or "").strip()
        ident = await self._authenticate(cred) if cred else Identity.failed("none", "missing credentials")
        view.ident = ident
        if not ident.ok or not cred:
            view.extra["failure_reason"] = ident.failure_reason or "authentication failed"
            nonce = new_nonce()
            view.set_cookies.append(_cookie(LOGIN_COOKIE, nonce, self.base, view.scope, max_age=3600))
            page = pages.login(self, view, self.sessions.csrf_token(nonce), ident.failure_reason or "")
            page.status = 401
            return page
        view.viewer = self.api.viewer_of(ident)
        view.set_cookies.append(_cookie(SESSION_COOKIE, self.sessions.seal(cred), self.base, view.scope))
        view.set_cookies.append(_cookie(LOGIN_COOKIE, "", self.base, view.scope, max_age=0))
        return self.base + "/search"

    # -- the audit event ----------------------------------------------------------------------

    async def _audit(self, view: View, status: int) -> None:
        ident = view.ident or Identity.anonymous()
        entry = {
            "record_type": "event",
            "event": view.event,
            "timestamp": iso(utcnow()),
            "actor": ident.as_actor(),
            "audit_role": view.viewer.role if view.viewer else None,
            "endpoint": view.endpoint,
            "query": view.query,
            "result_ids": view.result_ids,
            "result_count": len(view.result_ids),
            "outcome": "ok"
            if status < 400
            else {401: "unauthenticated", 403: "denied", 404: "not_found"}.get(status, "error"),
            "http_status": status,
            **view.extra,
        }
        try:
            pending = self.submit_event(entry)
            if pending is not None and inspect.isawaitable(pending):
                await pending
        except Exception as exc:
            raise Refused(503, "error.503", str(exc)) from None

    # -- responses ----------------------------------------------------------------------------

    def _render(self, view: View, page: Page) -> str:
        ident = view.ident if view.viewer is not None else None
        return layout(
            page,
            lang=view.lang,
            base=self.base,
            who=ident.user_id + " @ " + ident.org_id if ident else None,
            role=view.viewer.role if view.viewer else None,
            csrf=self.csrf(view) if view.viewer else None,
            here=_here(view.scope),
        )

    async def _send(self, send: Send, status: int, body: str | None, redirect: str, view: View) -> None:
        data = (body or "").encode()
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"),
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if redirect:
            headers.append((b"location", redirect.encode("latin-1", "replace")))
        for c in view.set_cookies:
            headers.append((b"set-cookie", c.encode("latin-1")))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _send_static(self, send: Send, name: str) -> None:
        ctype = STATIC.get(name)
        data = self._static.get(name)
        if ctype is None or data is None:
            data, ctype, status = b"not found", b"text/plain; charset=utf-8", 404
        else:
            status = 200
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-cache"),
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    # -- helpers used by the pages --------------------------------------------------------------

    async def fresh_store(self) -> None:
        """The audit API's freshness wait: the store has reached the log's signed end (bounded).

        The first call also starts building the console's sort and usage indexes in a thread of
        their own (:func:`~vllm_audit.console.queries.ensure_indexes`); pages work meanwhile.
        """
        await self.api._fresh_store()
        if self._indexing is None:
            self._indexing = threading.Thread(target=self._build_indexes, name="vllm-audit-console-index", daemon=True)
            self._indexing.start()

    def _build_indexes(self) -> None:
        try:
            ensure_indexes(self.store)
        except Exception as exc:  # sorting still works, only slower
            log.warning("console: could not create its indexes on the query store: %s", exc)

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def t(self, view: View, key: str) -> str:
        return t(view.lang, key)


def _read_static(name: str) -> bytes:
    return importlib.resources.files("vllm_audit.console").joinpath("static", name).read_bytes()


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise Refused(405, "error.400", f"method {method} not allowed")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


def _cookies(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        if k == b"cookie":
            for part in bytes(v).decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name and name not in out:
                    out[name] = value
    return out


def _cookie(name: str, value: str, path: str, scope: Scope, *, max_age: int | None = None) -> str:
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if scope.get("scheme") == "https":
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def _same_origin(scope: Scope) -> bool:
    """A POST must come from a page of this origin (Origin header, else Sec-Fetch-Site)."""
    origin = _header(scope, b"origin")
    host = _header(scope, b"host") or ""
    if origin is not None:
        scheme = str(scope.get("scheme", "http"))
        return origin == f"{scheme}://{host}"
    site = _header(scope, b"sec-fetch-site")
    return site in (None, "same-origin", "none")


def _query(scope: Scope) -> dict[str, str]:
    raw = bytes(scope.get("query_string", b"")).decode("utf-8", "replace")
    try:
        parsed = parse_qs(raw, keep_blank_values=True, max_num_fields=64)
    except ValueError:
        raise BadQuery("too many query parameters") from None
    out = {}
    for k, vs in parsed.items():
        if "\x00" in vs[0]:
            raise BadQuery(f"parameter {k!r} contains NUL")
        out[k] = vs[0]
    return out


async def _form(receive: Receive) -> dict[str, str]:
    try:
        chunks = await read_body(receive, MAX_FORM)
    except BodyError as exc:
        if exc.too_large:
            raise Refused(413, "error.400", "form too large") from None
        raise Refused(400, "error.400", "client disconnected") from None
    try:
        parsed = parse_qs(chunks.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "error.400", "the form is not valid") from None
    return {k: v[0] for k, v in parsed.items() if "\x00" not in v[0]}


def _here(scope: Scope) -> str:
    path = str(scope.get("path", ""))
    q = bytes(scope.get("query_string", b"")).decode("latin-1")
    return path + ("?" + q if q else "")
