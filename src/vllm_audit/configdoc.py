"""Render the configuration reference (docs/configuration.md) from the config dataclasses.

The ``#:`` comments above each field are its documentation; a test keeps the committed file
equal to what this renders, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from vllm_audit.config import Config

_FIELD = re.compile(r"^\s+(\w+)\s*:")


def _field_docs(cls: type) -> dict[str, str]:
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # pragma: no cover
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = _FIELD.match(line)
        if m and pending:
            docs[m.group(1)] = " ".join(pending)
        if not stripped.startswith("#"):
            pending = []
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (typing.Union,) or type(tp).__name__ == "UnionType":
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    if origin is tuple:
        return f"array of {_type_name(args[0])}" if args else "array"
    if origin is dict:
        return f"table of {_type_name(args[1])}" if len(args) == 2 else "table"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"table ({tp.__name__})"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover
        return ""
    if dataclasses.is_dataclass(value):
        return "see below"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    if value is None:
        return "unset"
    return f"`{value}`"


def _render_section(name: str, cls: type, out: list[str], seen: set[type], title: str = "") -> None:
    seen.add(cls)
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0]
    out.append(f"## {title or f'`[{name}]`'}\n")
    if doc:
        out.append(doc.replace("\n", " ") + "\n")
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out.append("| key | type | default | meaning |")
    out.append("|---|---|---|---|")
    nested: list[tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out.append(f"| `{f.name}` | {_type_name(tp)} | {_default(f)} | {docs.get(f.name, '')} |")
        for candidate in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(candidate) and isinstance(candidate, type) and candidate not in seen:
                keyed = typing.get_origin(tp) is dict
                label = f"{name}.{f.name}.<name>" if keyed else f"{name}.{f.name}"
                nested.append((label, candidate))
    out.append("")
    for label, sub in nested:
        _render_section(label, sub, out, seen)


def _render_sinks(out: list[str], seen: set[type]) -> None:
    from vllm_audit.sinks.registry import SINK_MODULES, sink_module

    out.append("## `[sinks.NAME]`\n")
    out.append(
        "One table per sink; `NAME` is yours (letters, digits, `-`, `_`), `type` picks the sink and "
        "the other keys are that type's, listed below. Secrets are never written in the file: keys "
        "of type Secret take `{ env = \"VAR\" }` or `{ file = \"/path\" }`.\n"
    )
    for type_ in sorted(SINK_MODULES):
        try:
            mod = sink_module(type_)
        except ImportError:  # pragma: no cover - a sink module not written yet
            continue
        title = f'`[sinks.NAME]` with `type = "{type_}"`'
        _render_section("sinks.NAME", mod.Options, out, seen, title)


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "One TOML file (`vllm-audit serve --config FILE`, or `VLLM_AUDIT_CONFIG=FILE` for vLLM's",
        "`--middleware`, which passes no arguments). `VLLM_AUDIT_OVERRIDES` may hold a JSON object",
        "merged over the file section by section. Unknown sections or keys and wrongly typed values",
        "are errors naming the file, section and key. Relative paths are relative to the working",
        "directory unless a key says otherwise.",
        "",
        "This page is generated from the code (`python -m vllm_audit.configdoc > docs/configuration.md`);",
        "a test fails when it is out of date.",
        "",
    ]
    hints = typing.get_type_hints(Config)
    seen: set[type] = set()
    for f in dataclasses.fields(Config):
        if f.name in ("source", "sinks"):
            continue
        _render_section(f.name, hints[f.name], out, seen)
    _render_sinks(out, seen)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
