"""The console's pages. Each reads as the viewer, notes what it showed on the view's audit event,
and returns a :class:`~vllm_audit.console.html.Page`."""

from __future__ import annotations

import datetime as dt
import importlib
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from vllm_audit.access.openapi import STATUSES
from vllm_audit.access.store import BadQuery, Viewer, norm_time, record_key
from vllm_audit.console import queries
from vllm_audit.console.charts import MAX_SERIES, line_chart
from vllm_audit.console.html import MARKER, Page, data_block, esc, field, hidden, marked, qs, select, table
from vllm_audit.console.i18n import t
from vllm_audit.console.logview import holds, read_verify, run_verify_summary, visible, writer_states
from vllm_audit.errors import AuditError

if TYPE_CHECKING:
    from vllm_audit.console.app import Console, View

#: Roles that see the integrity, alerts and export pages (users see their own records and usage).
AUDITORS = ("platform_admin", "org_auditor")


def _refused(status: int, key: str, detail: str = "") -> Exception:
    from vllm_audit.console.app import Refused

    return Refused(status, key, detail)


def error(lang: str, status: int, detail: str, *, key: str = "") -> Page:
    key = key or {404: "error.404", 403: "error.403", 503: "error.503"}.get(status, "error.400")
    text = t(lang, key)
    body = f'<p class="error" role="alert">{esc(text)}</p>'
    if detail and status in (400, 405, 413, 500):
        body += f"<p>{esc(detail)}</p>"
    return Page(t(lang, "error.title") + f" {status}", body, status=status)


# -- sign-in ------------------------------------------------------------------------------------


def login(c: Console, view: View, csrf: str, failure: str) -> Page:
    lang = view.lang
    if c.authenticator is None and c.config.access.auth != "trusted_header":
        return Page(t(lang, "signin.title"), f'<p class="error" role="alert">{esc(t(lang, "signin.unavailable"))}</p>')
    err = ""
    if failure:
        err = f'<p class="error" role="alert" id="signin-error">{esc(t(lang, "signin.failed"))}: {esc(failure)}</p>'
    body = (
        f"{err}<p>{esc(t(lang, 'signin.help'))}</p>"
        f'<form method="post" action="{esc(c.base)}/login" class="signin">{hidden("csrf", csrf)}'
        + field(t(lang, "signin.credential"), "credential", "", kind="password", extra=' autocomplete="off" required')
        + f'<button type="submit">{esc(t(lang, "signin.submit"))}</button></form>'
    )
    return Page(t(lang, "signin.title"), body)


# -- search -------------------------------------------------------------------------------------


def _cell_link(c: Console, key: str, text: str) -> str:
    return f'<a href="{esc(c.base)}/records/{esc(key)}">{esc(text)}</a>'


async def search(c: Console, view: View, viewer: Viewer, params: dict[str, str]) -> Page:
    lang = view.lang
    view.query = {k: v for k, v in params.items() if v}
    s = queries.parse_search(params, max_limit=c.config.access.api.max_limit)
    await c.fresh_store()
    rows, nxt = await c.in_thread(queries.search, c.store, viewer, s)
    view.result_ids = queries.keys_of(rows)
    any_ = t(lang, "f.any")
    keep = {k: params.get(k, "") for k in ("since", "until", *queries.FILTERS, "sort", "dir", "limit")}
    form = [
        f'<form method="get" action="{esc(c.base)}/search" class="filters" role="search">',
        field(
            t(lang, "f.since"), "since", params.get("since", ""), kind="text", extra=' placeholder="2026-01-31T00:00"'
        ),
        field(t(lang, "f.until"), "until", params.get("until", ""), kind="text", extra=' placeholder="2026-02-01"'),
    ]
    for name in ("user_id", "org_id", "model", "route"):
        form.append(field(t(lang, "f." + name), name, params.get(name, "")))
    form.append(
        select(t(lang, "f.status"), "status", params.get("status", ""), [("", any_), *((v, v) for v in STATUSES)])
    )
    form.append(
        select(
            t(lang, "f.auth_status"),
            "auth_status",
            params.get("auth_status", ""),
            [("", any_), *((v, v) for v in queries.AUTH_STATUSES)],
        )
    )
    form.append(field(t(lang, "f.request_id"), "request_id", params.get("request_id", "")))
    form.append(field(t(lang, "f.prompt_sha256"), "prompt_sha256", params.get("prompt_sha256", "")))
    form.append(select(t(lang, "f.sort"), "sort", s.sort, [(k, t(lang, "sort." + k)) for k in queries.SORT_KEYS]))
    form.append(
        select(
            t(lang, "f.dir"),
            "dir",
            "desc" if s.descending else "asc",
            [(d, t(lang, "dir." + d)) for d in ("desc", "asc")],
        )
    )
    form.append(select(t(lang, "f.limit"), "limit", str(s.limit), [(n, n) for n in ("25", "50", "100", "200")]))
    form.append(
        f'<div class="actions"><button type="submit">{esc(t(lang, "search.submit"))}</button> '
        f'<a href="{esc(c.base)}/search">{esc(t(lang, "search.reset"))}</a></div></form>'
    )
    head = [
        t(lang, k)
        for k in (
            "col.time",
            "col.user",
            "col.org",
            "col.model",
            "col.route",
            "col.status",
            "col.http",
            "col.tokens",
            "col.latency",
            "col.request_id",
        )
    ]
    body_rows = [
        [
            _cell_link(c, r.record_key, r.ts),
            esc(r.user_id),
            esc(r.org_id),
            esc(r.model),
            esc(r.route),
            f'<span class="status st-{esc(r.status)}">{esc(r.status)}</span>',
            esc(r.http_status if r.http_status is not None else ""),
            esc(r.total_tokens if r.total_tokens is not None else ""),
            esc(f"{r.latency_ms:.1f}" if r.latency_ms is not None else ""),
            f"<code>{esc(r.request_id)}</code>",
        ]
        for r in rows
    ]
    out = "".join(form)
    if rows:
        out += f'<p class="count" id="result-count">{len(rows)} {esc(t(lang, "search.shown"))}</p>'
        out += table(t(lang, "search.title"), head, body_rows, cls="results")
    else:
        out += f'<p id="result-count" class="count">{esc(t(lang, "search.none"))}</p>'
    pager = []
    if s.cursor is not None:
        pager.append(f'<a href="{esc(c.base)}/search?{esc(qs(keep))}">{esc(t(lang, "search.first"))}</a>')
    if nxt:
        pager.append(
            f'<a rel="next" href="{esc(c.base)}/search?{esc(qs({**keep, "cursor": nxt}))}">'
            f"{esc(t(lang, 'search.next'))}</a>"
        )
    if pager:
        out += f'<nav class="pager" aria-label="pages">{" ".join(pager)}</nav>'
    return Page(t(lang, "search.title"), out, active="search")


# -- record detail ------------------------------------------------------------------------------


def _value_html(v: Any) -> str:
    if isinstance(v, str):
        return f'<span class="v">{marked(v)}</span>'
    return f"<code>{marked(orjson.dumps(v).decode())}</code>"


def _markers(rec: Any, out: list[tuple[str, str]], path: str = "") -> None:
    if isinstance(rec, str):
        for m in MARKER.finditer(rec):
            out.append((path, m.group(0)))
    elif isinstance(rec, dict):
        for k, v in rec.items():
            _markers(v, out, f"{path}.{k}" if path else str(k))
    elif isinstance(rec, list):
        for i, v in enumerate(rec):
            _markers(v, out, f"{path}[{i}]")


def _proof_for(c: Console, rec: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
    """``(proof, server check result, error)`` for exactly this record (writer id and seq match)."""
    from vllm_audit.integrity.proofs import build_inclusion_proof, verify_inclusion_proof

    wid, seq = rec.get("writer_id"), rec.get("seq")
    if not isinstance(wid, str) or not isinstance(seq, int):
        return None, "", "no inclusion proof is available for this record"
    try:
        proof = build_inclusion_proof(c.log_dir, str(rec.get("request_id", "")), writer_id=wid, seq=seq)
    except Exception as exc:
        return None, "", str(exc)
    if not isinstance(proof, dict):
        return None, "", "no proof found"
    try:
        same = orjson.loads(proof["record"]) == dict(rec)
    except (KeyError, TypeError, orjson.JSONDecodeError):
        same = False
    if not same:
        return None, "", "the stored line does not match the query store's copy of this record"
    try:
        cp = verify_inclusion_proof(proof, c.keys)
        server = f"ok: leaf {proof['leaf_index']} of {cp.size}, signed by {cp.key_label}"
    except Exception as exc:
        server = f"FAILED: {exc}"
    return proof, server, ""


async def record(c: Console, view: View, viewer: Viewer, ident: str) -> Page:
    lang = view.lang
    view.query = {"id": ident[:256]}
    if not ident or len(ident) > 256 or "\x00" in ident:
        raise BadQuery("invalid record id")
    await c.fresh_store()
    found = await c.in_thread(c.store.find, viewer, ident)
    if not found:
        raise _refused(404, "error.404")  # absent and not-yours look the same
    rec = found[0]
    view.result_ids = [record_key(r) for r in found]
    proof, server, perr = await c.in_thread(_proof_for, c, rec)
    rows = [[f"<code>{esc(k)}</code>", _value_html(v)] for k, v in rec.items()]
    marks: list[tuple[str, str]] = []
    _markers(rec, marks)
    out = table(t(lang, "record.fields"), ["field", "value"], rows, cls="fields")
    out += f'<section aria-labelledby="h-red"><h2 id="h-red">{esc(t(lang, "record.redactions"))}</h2>'
    if marks:
        out += (
            "<ul class='markers'>"
            + "".join(f"<li><code>{esc(p)}</code>: <mark class='redacted'>{esc(m)}</mark></li>" for p, m in marks[:200])
            + "</ul>"
        )
    else:
        out += f"<p>{esc(t(lang, 'record.redactions.none'))}</p>"
    out += "</section>"
    out += f'<section aria-labelledby="h-proof" id="proof-section"><h2 id="h-proof">{esc(t(lang, "record.proof"))}</h2>'
    if proof is None:
        out += (
            f'<p id="proof-status" class="proof-none" role="status">'
            f"{esc(t(lang, 'record.proof.none'))}: {esc(perr)}</p>"
        )
    else:
        labels = {
            k: t(lang, k)
            for k in (
                "proof.ok",
                "proof.fail",
                "proof.server_only",
                "proof.step.record",
                "proof.step.leaf",
                "proof.step.root",
                "proof.step.size",
                "proof.step.sig",
                "record.proof.checking",
            )
        }
        payload = {
            "proof": proof,
            "record": rec,
            "keys": [k.vkey() for k in c.keys],
            "server": server,
            "labels": labels,
        }
        out += data_block("proof-data", orjson.dumps(payload).decode())
        out += (
            f'<p id="proof-status" class="proof-pending" role="status" aria-live="polite">'
            f'{esc(t(lang, "record.proof.checking"))}</p><ol id="proof-steps" class="steps"></ol>'
            f"<p><strong>{esc(t(lang, 'record.server_result'))}:</strong> "
            f'<span id="server-result">{esc(server)}</span></p>'
            f"<p><strong>{esc(t(lang, 'record.key'))}:</strong> <code>{esc(proof.get('key_id', ''))}</code>"
            + "".join(f' <span class="fp">sha256:{esc(k.fingerprint)}</span>' for k in c.keys)
            + "</p>"
            f'<h3>{esc(t(lang, "record.checkpoint"))}</h3><pre id="checkpoint">{esc(proof.get("checkpoint", ""))}</pre>'
            f"<p>leaf_index <code>{esc(proof.get('leaf_index'))}</code>, "
            f"tree_size <code>{esc(proof.get('tree_size'))}</code>,"
            f' leaf_hash <code class="hash">{esc(proof.get("leaf_hash"))}</code></p>'
        )
    out += "</section>"
    if len(found) > 1:
        items = "".join(
            f"<li>{_cell_link(c, record_key(r), record_key(r))} ({esc(r.get('timestamp', ''))})</li>" for r in found[1:]
        )
        out += f"<h2>{esc(t(lang, 'record.matches'))}</h2><ul>{items}</ul>"
    title = f"{t(lang, 'record.title')} {record_key(rec)}"
    return Page(title, out, active="search")


# -- integrity ----------------------------------------------------------------------------------


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


async def integrity(c: Console, view: View, viewer: Viewer) -> Page:
    lang = view.lang
    if viewer.role not in AUDITORS:
        raise _refused(403, "error.403", t(lang, "integrity.admin_only"))
    states = await c.in_thread(writer_states, c.log_dir, c.keys)
    view.result_ids = [w.writer_id for w in states]
    rows = []
    for w in states:
        sig = (
            f'<span class="ok">{esc(t(lang, "yes"))}</span>'
            if w.signature_ok
            else f'<span class="bad">{esc(t(lang, "no"))}</span> {esc(w.signature_error[:160])}'
        )
        pruned = ", ".join(f"[{p.get('start')}, {p.get('end')})" for p in w.pruned) or t(lang, "integrity.none")
        rows.append(
            [
                f"<code>{esc(w.writer_id)}</code>",
                esc(w.signed_size),
                esc(w.checkpoint.time if w.checkpoint else "-"),
                esc(_age(w.age_s)),
                sig,
                esc(pruned),
            ]
        )
    head = [
        t(lang, k)
        for k in (
            "integrity.writer",
            "integrity.signed_size",
            "integrity.checkpoint_time",
            "integrity.age",
            "integrity.signature",
            "integrity.pruned",
        )
    ]
    out = table(t(lang, "integrity.title"), head, rows, cls="writers")
    hs = await c.in_thread(holds, c.config)
    if hs is not None:
        out += f"<h2>{esc(t(lang, 'integrity.holds'))}</h2>"
        if hs:
            out += "<ul>" + "".join(f"<li><code>{esc(orjson.dumps(h).decode())}</code></li>" for h in hs) + "</ul>"
        else:
            out += f"<p>{esc(t(lang, 'integrity.none'))}</p>"
    last = await c.in_thread(read_verify, c.state)
    out += f'<h2>{esc(t(lang, "integrity.verify"))}</h2><div id="verify-result">'
    if last is None:
        out += f"<p>{esc(t(lang, 'integrity.verify.never'))}</p>"
    else:
        word = t(lang, "integrity.intact") if last.get("intact") else t(lang, "integrity.not_intact")
        cls = "ok" if last.get("intact") else "bad"
        out += (
            f'<p><strong class="{cls}">{esc(word)}</strong> — {esc(last.get("started"))}, '
            f"{esc(last.get('writers'))} writer(s), {esc(last.get('entries'))} entries"
            f"{', ' + esc(last.get('by')) if last.get('by') else ''}</p>"
        )
        if last.get("problems"):
            out += "<ul>" + "".join(f"<li>{esc(p)}</li>" for p in last["problems"]) + "</ul>"
    out += "</div>"
    if viewer.role == "platform_admin":
        out += (
            f'<form method="post" action="{esc(c.base)}/integrity/verify">{hidden("csrf", c.csrf(view))}'
            f'<button type="submit">{esc(t(lang, "integrity.verify.run"))}</button></form>'
        )
    return Page(t(lang, "integrity.title"), out, active="integrity")


async def run_verify(c: Console, view: View, viewer: Viewer) -> str:
    if viewer.role != "platform_admin":
        raise _refused(403, "error.403")
    by = view.ident.user_id if view.ident else ""
    summary = await c.in_thread(run_verify_summary, c.config, c.state, c.keys, by)
    view.extra["verify"] = {k: summary[k] for k in ("intact", "writers", "entries", "problem_count")}
    return c.base + "/integrity"


# -- alerts -------------------------------------------------------------------------------------


async def alerts(c: Console, view: View, viewer: Viewer) -> Page:
    lang = view.lang
    if viewer.role not in AUDITORS:
        raise _refused(403, "error.403", t(lang, "alerts.not_for_role"))
    await c.in_thread(c.alerts.refresh)
    items = c.alerts.for_viewer(viewer)[:500]
    view.result_ids = [a.alert_id for a in items]
    rows = []
    for a in items:
        e = a.entry
        rule_v = e.get("rule")
        rule: dict[str, Any] = rule_v if isinstance(rule_v, dict) else {}
        state = t(lang, "alerts.acked") if a.acked_by else t(lang, "alerts.open")
        rows.append(
            [
                f'<a href="{esc(c.base)}/alerts/{esc(a.alert_id)}">{esc(rule.get("id", a.alert_id))}</a>',
                f'<span class="sev sev-{esc(e.get("severity", ""))}">{esc(e.get("severity", ""))}</span>',
                esc(e.get("reason", "")),
                esc(a.org_id or ""),
                esc(e.get("window_start", "")),
                f'<span class="{"ok" if a.acked_by else "open"}">{esc(state)}</span>',
            ]
        )
    head = [
        t(lang, k)
        for k in ("alerts.rule", "alerts.severity", "alerts.reason", "alerts.org", "alerts.time", "alerts.state")
    ]
    out = table(t(lang, "alerts.title"), head, rows, cls="alerts") if rows else f"<p>{esc(t(lang, 'alerts.none'))}</p>"
    return Page(t(lang, "alerts.title"), out, active="alerts")


async def alert(c: Console, view: View, viewer: Viewer, alert_id: str) -> Page:
    lang = view.lang
    view.query = {"alert_id": alert_id[:128]}
    if viewer.role not in AUDITORS:
        raise _refused(403, "error.403", t(lang, "alerts.not_for_role"))
    await c.in_thread(c.alerts.refresh)
    a = c.alerts.alerts.get(alert_id)
    if a is None or not visible(a, viewer):
        raise _refused(404, "error.404")
    view.result_ids = [alert_id]
    rows = [[f"<code>{esc(k)}</code>", _value_html(v)] for k, v in a.entry.items() if k != "triggers"]
    out = table(t(lang, "alerts.title"), ["field", "value"], rows, cls="fields")
    trig_v = a.entry.get("triggers")
    trig: list[Any] = trig_v if isinstance(trig_v, list) else []
    links = []
    for tr in trig:
        if not isinstance(tr, dict):
            continue
        key = tr.get("record_id") or f"{tr.get('writer_id')}:{tr.get('seq')}"
        links.append(f"<li>{_cell_link(c, str(key), str(key))}</li>")
    out += f"<h2>{esc(t(lang, 'alerts.triggers'))}</h2><ul id='triggers'>{''.join(links)}</ul>"
    if a.acked_by:
        out += f'<p id="ack-state" class="ok">{esc(t(lang, "alerts.acked"))}: {esc(a.acked_by)} {esc(a.acked_at)}</p>'
    else:
        out += (
            f'<p id="ack-state" class="open">{esc(t(lang, "alerts.open"))}</p>'
            f'<form method="post" action="{esc(c.base)}/alerts/{esc(alert_id)}/ack">{hidden("csrf", c.csrf(view))}'
            f'<button type="submit" id="ack">{esc(t(lang, "alerts.ack"))}</button></form>'
        )
    return Page(f"{t(lang, 'alerts.title')} {alert_id}", out, active="alerts")


async def ack(c: Console, view: View, viewer: Viewer, alert_id: str) -> str:
    view.query = {"alert_id": alert_id[:128]}
    view.extra["alert_id"] = alert_id[:128]
    if viewer.role not in AUDITORS:
        raise _refused(403, "error.403")
    await c.in_thread(c.alerts.refresh)
    a = c.alerts.alerts.get(alert_id)
    if a is None or not visible(a, viewer):
        raise _refused(404, "error.404")
    view.result_ids = [alert_id]
    # The ``alert_acknowledged`` event is this request's audit event (written and awaited by the app);
    # the index learns it from the log, and notes it now for the redirect that follows.
    by = view.ident.user_id if view.ident else ""
    view.after_audit = lambda: c.alerts.ack(alert_id, by, dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))
    return f"{c.base}/alerts/{alert_id}"


# -- usage --------------------------------------------------------------------------------------


async def usage(c: Console, view: View, viewer: Viewer, params: dict[str, str]) -> Page:
    lang = view.lang
    group = params.get("group") or "model"
    if group not in ("org_id", "user_id", "model"):
        raise BadQuery("group must be org_id, user_id or model")
    now = c.now()
    since = params.get("since") or (now - dt.timedelta(days=30)).strftime("%Y-%m-%d")
    until = params.get("until") or ""
    view.query = {"group": group, "since": since, **({"until": until} if until else {})}
    since_n = norm_time(since)
    until_n = norm_time(until) if until else None
    await c.fresh_store()
    points = await c.in_thread(queries.usage, c.store, viewer, group, since_n, until_n)
    days = sorted({p.day for p in points})
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])
    for p in points:
        tt = totals[p.group]
        tt[0] += p.calls
        tt[1] += p.tokens
        tt[2] += p.latency_sum
        tt[3] += p.latency_n
    top = sorted(totals, key=lambda g: -totals[g][0])
    shown = top[: MAX_SERIES - 1] if len(top) > MAX_SERIES else top
    other = "other" if len(top) > len(shown) else ""
    view.result_ids = [f"{group}={g}" for g in top[:100]]

    def series(idx: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [0.0] * len(days) for name in [*shown, *([other] if other else [])]}
        lat: dict[str, list[list[float]]] = {name: [[0.0, 0.0] for _ in days] for name in out}
        di = {d: i for i, d in enumerate(days)}
        for p in points:
            name = p.group if p.group in out else other
            if idx == 0:
                out[name][di[p.day]] += p.calls
            elif idx == 1:
                out[name][di[p.day]] += p.tokens
            else:
                lat[name][di[p.day]][0] += p.latency_sum
                lat[name][di[p.day]][1] += p.latency_n
        if idx == 2:
            for name, cells in lat.items():
                out[name] = [s / n if n else 0.0 for s, n in cells]
        return out

    form = (
        f'<form method="get" action="{esc(c.base)}/usage" class="filters">'
        + select(
            t(lang, "usage.group"),
            "group",
            group,
            [(g, t(lang, "usage.by." + g)) for g in ("org_id", "user_id", "model")],
        )
        + field(t(lang, "f.since"), "since", since)
        + field(t(lang, "f.until"), "until", until)
        + f'<div class="actions"><button type="submit">{esc(t(lang, "usage.show"))}</button></div></form>'
    )
    if not points:
        return Page(t(lang, "usage.title"), form + f"<p>{esc(t(lang, 'usage.none'))}</p>", active="usage")
    charts = "".join(
        f"<figure><figcaption>{esc(t(lang, key))}</figcaption>"
        f"{line_chart(t(lang, key), days, series(i), chart_id=cid)}</figure>"
        for i, (key, cid) in enumerate(
            (("usage.calls", "chart-calls"), ("usage.tokens", "chart-tokens"), ("usage.latency", "chart-latency"))
        )
    )
    rows = [
        [
            esc(g),
            esc(int(totals[g][0])),
            esc(int(totals[g][1])),
            esc(f"{totals[g][2] / totals[g][3]:.1f}" if totals[g][3] else ""),
        ]
        for g in top
    ]
    tab = table(t(lang, "usage.table"), [t(lang, "usage.by." + group), "calls", "tokens", "mean latency (ms)"], rows)
    return Page(t(lang, "usage.title"), form + f'<div class="charts">{charts}</div>' + tab, active="usage")


# -- export -------------------------------------------------------------------------------------


def _exporter() -> Any:
    """The export area's ``build_bundle``, when that area is installed."""
    try:
        mod = importlib.import_module("vllm_audit.export.bundle")
    except ImportError:
        return None
    fn = getattr(mod, "build_bundle", None)
    return fn if callable(fn) else None


def _do_export(c: Console, org: str, t_from: str, t_to: str) -> dict[str, Any]:
    fn = _exporter()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in org)[:64] or "org"
    out = c.state / "exports" / f"{safe}-{stamp}"
    res = fn(c.config, org, t_from, t_to, out, keys=c.keys)
    return {"out": str(res.out), "records": res.records, "writers": res.writers, "bytes": res.bytes}


def _export_form(c: Console, view: View, viewer: Viewer) -> str:
    lang = view.lang
    org = viewer.org_id if viewer.role != "platform_admin" else ""
    org_field = (
        field(t(lang, "export.org"), "org_id", org)
        if viewer.role == "platform_admin"
        else f"<p>{esc(t(lang, 'export.org'))}: <code>{esc(org)}</code></p>"
    )
    return (
        f'<form method="post" action="{esc(c.base)}/export" class="filters">{hidden("csrf", c.csrf(view))}{org_field}'
        + field(t(lang, "f.since"), "since", "")
        + field(t(lang, "f.until"), "until", "")
        + f'<div class="actions"><button type="submit">{esc(t(lang, "export.start"))}</button></div></form>'
    )


async def export(c: Console, view: View, viewer: Viewer) -> Page:
    lang = view.lang
    if viewer.role not in AUDITORS:
        raise _refused(403, "error.403", t(lang, "export.admin_only"))
    if _exporter() is None:
        return Page(
            t(lang, "export.title"), f'<p id="export-state">{esc(t(lang, "export.unavailable"))}</p>', active="export"
        )
    return Page(t(lang, "export.title"), _export_form(c, view, viewer), active="export")


async def start_export(c: Console, view: View, viewer: Viewer, form: Mapping[str, str]) -> Page:
    lang = view.lang
    view.endpoint = "console.export"
    if viewer.role not in AUDITORS:
        raise _refused(403, "error.403", t(lang, "export.admin_only"))
    if _exporter() is None:
        raise _refused(404, "error.404", t(lang, "export.unavailable"))
    org = (form.get("org_id") or "").strip() if viewer.role == "platform_admin" else viewer.org_id
    if not org:
        raise BadQuery("org_id is required")
    now = c.now()
    since = norm_time(form["since"]) if form.get("since") else norm_time((now - dt.timedelta(days=30)).isoformat())
    until = norm_time(form["until"]) if form.get("until") else norm_time(now.isoformat())
    view.query = {"org_id": org, "since": since, "until": until}
    try:
        result = await c.in_thread(_do_export, c, org, since, until)
    except AuditError as exc:
        raise BadQuery(f"the export could not be built: {exc}") from None
    view.extra["export"] = result
    view.result_ids = [f"org_id={org}"]
    body = (
        f'<p id="export-state" class="ok">{esc(t(lang, "export.done"))}: {esc(result["records"])} records, '
        f"{esc(result['writers'])} writer(s), {esc(result['bytes'])} bytes</p><p><code>{esc(result['out'])}</code></p>"
    )
    return Page(t(lang, "export.title"), body + _export_form(c, view, viewer), active="export")
