"""The OpenAPI 3 description of the audit API (served at ``{base}/openapi.json``)."""

from __future__ import annotations

from typing import Any

STATUSES = ("ok", "client_error", "upstream_error", "timeout", "cancelled", "rejected")


#: Free text: anything but NUL (PostgreSQL text cannot hold it).
TEXT: dict[str, Any] = {"type": "string", "pattern": "^[^\\u0000]*$"}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, ref: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}}


COMMON_ERRORS = {
    "400": _err("Invalid parameter."),
    "401": _err("Missing or invalid credentials."),
    "404": _err("Not found (also for records of another tenant)."),
    "503": _err("The read could not be recorded in the audit log."),
}


def openapi_spec(base: str, max_limit: int) -> dict[str, Any]:
    filters = [
        _q("since", {"type": "string", "format": "date-time"}, "Records at or after this time (ISO 8601)."),
        _q("until", {"type": "string", "format": "date-time"}, "Records before this time (ISO 8601)."),
        _q("user_id", TEXT, "Only this user's calls."),
        _q("org_id", TEXT, "Only this org's calls."),
        _q("model", TEXT, "Only calls to this model."),
    ]
    record_filters = [
        *filters,
        _q("status", {"type": "string", "enum": list(STATUSES)}, "Only calls with this outcome."),
        _q("route", TEXT, "Only calls to this route (e.g. /v1/chat/completions)."),
        _q("request_id", TEXT, "Only the call(s) with this request id."),
        _q("prompt_sha256", {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "Only calls with this prompt hash."),
        _q("q", TEXT, "Case-insensitive text in the (redacted) prompt or response."),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": max_limit}, "Page size."),
        _q("cursor", {"type": "string"}, "The next_cursor of the previous page."),
    ]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "vllm-audit query API",
            "version": "1",
            "description": "Tenant-isolated read access to the audit log. Every call is itself audited.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            f"{base}/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI document.", "content": {"application/json": {}}}},
                }
            },
            f"{base}/records": {
                "get": {
                    "summary": "Search records (newest first, cursor pagination).",
                    "parameters": record_filters,
                    "responses": {**_ok("A page of records.", "#/components/schemas/RecordPage"), **COMMON_ERRORS},
                }
            },
            f"{base}/records/{{request_id}}": {
                "get": {
                    "summary": "One record with its inclusion proof.",
                    "parameters": [
                        {
                            "name": "request_id",
                            "in": "path",
                            "required": True,
                            "schema": {**TEXT, "minLength": 1, "maxLength": 256},
                        }
                    ],
                    "responses": {**_ok("The record.", "#/components/schemas/RecordWithProof"), **COMMON_ERRORS},
                }
            },
            f"{base}/usage": {
                "get": {
                    "summary": "Calls and tokens, grouped.",
                    "parameters": [
                        *filters,
                        _q(
                            "group_by",
                            {"type": "string", "pattern": "^(day|org_id|user_id|model)(,(day|org_id|user_id|model))*$"},
                            "Comma separated subset of day, org_id, user_id, model (default: all).",
                        ),
                    ],
                    "responses": {**_ok("Aggregates.", "#/components/schemas/Usage"), **COMMON_ERRORS},
                }
            },
            f"{base}/whoami": {
                "get": {
                    "summary": "The caller's identity and audit role.",
                    "responses": {**_ok("Identity.", "#/components/schemas/WhoAmI"), **COMMON_ERRORS},
                }
            },
            f"{base}/keys": {
                "get": {
                    "summary": "List API keys (platform_admin).",
                    "responses": {
                        **_ok("Keys (never their secrets).", "#/components/schemas/KeyList"),
                        "403": _err("Not a platform administrator."),
                        **COMMON_ERRORS,
                    },
                },
                "post": {
                    "summary": "Issue an API key (platform_admin). The key is shown once.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewKey"}}},
                    },
                    "responses": {
                        **_ok("The new key.", "#/components/schemas/IssuedKey", "201"),
                        "403": _err("Not a platform administrator."),
                        "413": _err("Body too large."),
                        **COMMON_ERRORS,
                    },
                },
            },
            f"{base}/keys/{{key_id}}/revoke": {
                "post": {
                    "summary": "Revoke an API key at once (platform_admin).",
                    "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        **_ok("The revoked key.", "#/components/schemas/Key"),
                        "403": _err("Not a platform administrator."),
                        **COMMON_ERRORS,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "JWT or API key."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"nullable": True},
                                "code": {"type": "string"},
                            },
                        }
                    },
                },
                "Record": {
                    "type": "object",
                    "description": "An audit record as stored in the log (schema audit-record-v1).",
                    "required": ["seq", "writer_id"],
                    "properties": {
                        "seq": {"type": "integer"},
                        "writer_id": {"type": "string"},
                        "request_id": {"type": "string"},
                        "org_id": {"type": "string"},
                        "user_id": {"type": "string"},
                    },
                    "additionalProperties": True,
                },
                "RecordPage": {
                    "type": "object",
                    "required": ["records", "next_cursor"],
                    "properties": {
                        "records": {"type": "array", "items": {"$ref": "#/components/schemas/Record"}},
                        "next_cursor": {"type": "string", "nullable": True},
                    },
                },
                "RecordWithProof": {
                    "type": "object",
                    "required": ["record", "proof"],
                    "properties": {
                        "record": {"$ref": "#/components/schemas/Record"},
                        "proof": {"type": "object", "nullable": True, "additionalProperties": True},
                        "proof_error": {"type": "string", "nullable": True},
                    },
                },
                "Usage": {
                    "type": "object",
                    "required": ["group_by", "usage"],
                    "properties": {
                        "group_by": {"type": "array", "items": {"type": "string"}},
                        "usage": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["calls", "prompt_tokens", "completion_tokens", "total_tokens", "errors"],
                                "properties": {
                                    "day": {"type": "string"},
                                    "org_id": {"type": "string"},
                                    "user_id": {"type": "string"},
                                    "model": {"type": "string", "nullable": True},
                                    "calls": {"type": "integer"},
                                    "prompt_tokens": {"type": "integer"},
                                    "completion_tokens": {"type": "integer"},
                                    "total_tokens": {"type": "integer"},
                                    "errors": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
                "WhoAmI": {
                    "type": "object",
                    "required": ["user_id", "org_id", "roles", "audit_role"],
                    "properties": {
                        "user_id": {"type": "string"},
                        "org_id": {"type": "string"},
                        "roles": {"type": "array", "items": {"type": "string"}},
                        "audit_role": {"type": "string", "enum": ["user", "org_auditor", "platform_admin"]},
                    },
                },
                "Key": {
                    "type": "object",
                    "required": ["key_id", "user_id", "org_id", "roles", "status"],
                    "properties": {
                        "key_id": {"type": "string"},
                        "user_id": {"type": "string"},
                        "org_id": {"type": "string"},
                        "roles": {"type": "array", "items": {"type": "string"}},
                        "created": {"type": "string"},
                        "expires": {"type": "string", "nullable": True},
                        "revoked": {"type": "boolean"},
                        "revoked_at": {"type": "string", "nullable": True},
                        "description": {"type": "string"},
                        "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
                    },
                },
                "KeyList": {
                    "type": "object",
                    "required": ["keys"],
                    "properties": {"keys": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}}},
                },
                "NewKey": {
                    "type": "object",
                    "required": ["user_id", "org_id"],
                    "properties": {
                        "user_id": {**TEXT, "minLength": 1},
                        "org_id": {**TEXT, "minLength": 1},
                        "roles": {"type": "array", "items": TEXT},
                        "expires_in_days": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 3650},
                        "description": TEXT,
                    },
                },
                "IssuedKey": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Key"},
                        {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}},
                    ]
                },
            },
        },
    }
