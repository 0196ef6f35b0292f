"""Turning an exchange into a record (runs on the writer thread)."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_audit.capture import Exchange
from vllm_audit.finalize import finalize


def exchange(route: str, req: object, chunks: list[bytes], ctype: bytes, status: int = 200) -> Exchange:
    ex = Exchange("rid-1", "POST", route)
    ex.request_body = orjson.dumps(req)
    ex.request_bytes = len(ex.request_body)
    ex.chunks = chunks
    ex.content_type = ctype
    ex.http_status = status
    ex.completed = True
    return ex


def sse(*objs: object) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def test_vllm_style_chat_stream_with_two_choices() -> None:
    """n=2 streams give a list of outputs and of finish reasons; usage from the final chunk."""
    body = sse(
        {
            "id": "chatcmpl-x",
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}],
        },
        {
            "id": "chatcmpl-x",
            "model": "m",
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"},
                {"index": 1, "delta": {"content": "c"}, "finish_reason": "length"},
            ],
        },
        {
            "id": "chatcmpl-x",
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
        },
    )
    rec = finalize(
        exchange("/v1/chat/completions", {"model": "m", "messages": [], "stream": True}, [body], b"text/event-stream")
    )
    assert ["a", "bc"] == rec["output_response"]
    assert ["stop", "length"] == rec["finish_reason"]
    assert (4, 3, 7, "stream") == (
        rec["prompt_tokens"],
        rec["completion_tokens"],
        rec["total_tokens"],
        rec["usage_source"],
    )
    assert "chatcmpl-x" == rec["response_id"]


def test_tool_calls_are_kept_with_the_content() -> None:
    """A tool call answer records the calls next to the (empty) content."""
    resp = {
        "id": "c",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    rec = finalize(
        exchange("/v1/chat/completions", {"model": "m", "messages": []}, [orjson.dumps(resp)], b"application/json")
    )
    assert "f" == rec["output_response"]["tool_calls"][0]["function"]["name"]
    assert "tool_calls" == rec["finish_reason"]


def test_error_body_fills_error_fields() -> None:
    """An OpenAI error body becomes error_type and error_message."""
    err = {"error": {"message": "bad model", "type": "NotFoundError", "code": 404}}
    rec = finalize(
        exchange("/v1/completions", {"model": "x", "prompt": "p"}, [orjson.dumps(err)], b"application/json", 404)
    )
    assert ("NotFoundError", "bad model", "client_error") == (rec["error_type"], rec["error_message"], rec["status"])


def test_garbage_never_loses_the_record() -> None:
    """Undecodable bodies still give a record with the metadata."""
    ex = exchange("/v1/chat/completions", {}, [b"\xff\xfe not json"], b"application/json")
    ex.request_body = b"\x00\x01"
    rec = finalize(ex)
    assert ("rid-1", None, None) == (rec["request_id"], rec["input_prompt"], rec["output_response"])


def test_truncated_response_is_not_parsed_but_flagged() -> None:
    """A response captured only in part is flagged, not half-parsed."""
    ex = exchange(
        "/v1/completions", {"model": "m", "prompt": "p"}, [b'{"choices": [{"text": "abc'], b"application/json"
    )
    ex.response_truncated = True
    rec = finalize(ex)
    assert rec["response_truncated"] and rec["output_response"] is None


def test_incomplete_success_is_an_upstream_error() -> None:
    """A 200 response that never finished (and no disconnect) is not 'ok'."""
    ex = exchange("/v1/completions", {"model": "m", "prompt": "p"}, [], b"application/json")
    ex.completed = False
    assert "upstream_error" == finalize(ex)["status"]


def test_parse_json_agrees_with_json_loads() -> None:
    """The edge's parser accepts what vLLM's json.loads accepts, and says why when nothing can."""
    from vllm_audit.capture import parse_json

    assert ({"a": 2}, None) == parse_json(b'{"a": 1, "a": 2}')  # duplicate keys: the last wins, as in json.loads
    assert ({"a": 1}, None) == parse_json(b'\xef\xbb\xbf{"a": 1}')
    assert ({"a": float("nan")}.keys(), None) == (parse_json(b'{"a": NaN}')[0].keys(), None)
    value, err = parse_json(b"[" * 3000 + b"]" * 3000)
    assert value is None and err is not None and "nested" in err
    value, err = parse_json(b"{")
    assert value is None and err is not None and "not valid JSON" in err


def test_lax_bool_matches_pydantic() -> None:
    """The values pydantic's lax bool turns into True, and only those."""
    from vllm_audit.capture import lax_bool

    for yes in (True, 1, 1.0, "1", "true", "TRUE", "t", "y", "yes", "on", "On"):
        assert lax_bool(yes), yes
    nos: tuple[object, ...] = (False, 0, None, "0", "false", "no", "off", "", "maybe", 2, [], {})
    for no in nos:
        assert not lax_bool(no), no


def test_normalize_path() -> None:
    """Repeated slashes and dot segments are resolved; normal paths come back as they are."""
    from vllm_audit.capture import normalize_path

    assert "/v1/chat/completions" == normalize_path("/v1/chat/completions")
    assert "/v1/chat/completions" == normalize_path("//v1//chat/./completions")
    assert "/v1/chat/completions" == normalize_path("/v1/models/../chat/completions")
    assert "/" == normalize_path("/../..")


def test_route_fields_decide_the_prompt() -> None:
    """Each route records the fields it acts on; several present are kept side by side."""
    rec = finalize(exchange("/v1/responses", {"model": "m", "instructions": "be brief", "input": "hi"}, [], b""))
    assert {"instructions": "be brief", "input": "hi"} == rec["input_prompt"]
    rec = finalize(exchange("/v1/embeddings", {"model": "m", "input": ["a"]}, [], b""))
    assert ["a"] == rec["input_prompt"] and "captured" == rec["prompt_status"]
    rec = finalize(exchange("/v1/models", {}, [], b""))
    assert (None, "absent") == (rec["input_prompt"], rec["prompt_status"])


def test_record_id_is_unique_per_exchange() -> None:
    """Every exchange gets its own UUIDv7 record_id, whatever its request id."""
    a = finalize(exchange("/v1/completions", {"prompt": "p"}, [], b""))
    b = finalize(exchange("/v1/completions", {"prompt": "p"}, [], b""))
    assert a["request_id"] == b["request_id"] and a["record_id"] != b["record_id"]


def test_records_of_one_caller_own_their_identity_fields() -> None:
    """The identity fields are computed once per caller; each record still gets lists and dicts of its own."""
    from vllm_audit.access.identity import Identity
    from vllm_audit.access.quota import quota_subject

    alice = Identity("alice", "acme", ("admin",), "authenticated", "api_key", "key-1")
    records = []
    for _ in range(2):
        ex = exchange("/v1/completions", {"prompt": "p"}, [], b"")
        ex.identity = Identity("alice", "acme", ("admin",), "authenticated", "api_key", "key-1")  # equal, not the same
        records.append(finalize(ex))
    a, b = records
    assert quota_subject("alice", "acme", "key-1") == a["quota_subject"] == b["quota_subject"]
    a["roles"].append("mutated")
    a["quota_subject"]["user"] = "mutated"
    assert ["admin"] == b["roles"] and quota_subject("alice", "acme", "key-1") == b["quota_subject"]
    ex = exchange("/v1/completions", {"prompt": "p"}, [], b"")
    ex.identity = alice
    again = finalize(ex)
    assert (["admin"], "alice", "acme", "key-1") == (again["roles"], again["user_id"], again["org_id"], again["key_id"])
    # Another caller, a failed one and one whose roles are (wrongly) a list are their own.
    bob = Identity.failed("jwt", "bad signature")
    ex.identity = bob
    rec = finalize(ex)
    assert ("anonymous", "failed", "bad signature", "authentication_error") == (
        rec["user_id"], rec["auth_status"], rec["error_message"], rec["error_type"]
    )  # fmt: skip
    ex.identity = Identity("carol", "acme", ["r"], "authenticated", "jwt")  # type: ignore[arg-type]
    rec = finalize(ex)
    assert ("carol", ["r"]) == (rec["user_id"], rec["roles"])


def test_event_stream_lines_are_read_as_the_spec_says() -> None:
    """``data:`` with or without a space, CRLF line ends, other fields and ``[DONE]``; choice 0 and 1 apart."""
    body = (
        b": a comment\r\n"
        b'data:{"id":"r","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\r\n\r\n'
        b"event: ignored\n"
        b'data: \t{"choices":[{"index":1,"delta":{"content":"x"}},{"index":0,"delta":{"content":"b"}}]} \n\n'
        b' data: {"choices":[{"index":0,"delta":{"content":"not a data line"}}]}\n\n'
        b'data: {"choices":[{"index":"0","delta":{"content":"c"},"finish_reason":"stop"}]}\n\n'
        b"data:\n\n"
        b"data: [DONE]\n\n"
    )
    rec = finalize(exchange("/v1/chat/completions", {"model": "m", "stream": True}, [body], b"text/event-stream"))
    assert ["abc", "x"] == rec["output_response"]  # a non-integer index counts as choice 0, as the upstream's
    assert ("stop", "r", "m") == (rec["finish_reason"], rec["response_id"], rec["model_name"])


def test_an_exchange_pickles_with_every_slot() -> None:
    """The prepare processes receive exchanges pickled as one tuple: every slot comes back, a new slot too."""
    import pickle

    ex = Exchange("rid-p", "POST", "/v1/chat/completions")
    for i, name in enumerate(Exchange.__slots__):
        setattr(ex, name, (name, i))  # a distinct value per slot
    back = pickle.loads(pickle.dumps([ex, ex], protocol=pickle.HIGHEST_PROTOCOL))
    assert back[0] is back[1]  # shared within one batch, as pickle memoises
    assert [(name, i) for i, name in enumerate(Exchange.__slots__)] == [
        getattr(back[0], name) for name in Exchange.__slots__
    ]
    real = exchange("/v1/chat/completions", {"model": "m", "messages": []}, [b'{"choices": []}'], b"application/json")
    real.t_end = real.t0 + 0.25
    copy = pickle.loads(pickle.dumps(real))
    assert finalize(real) | {"record_id": None} == finalize(copy) | {"record_id": None}
    assert real.record_id == copy.record_id


_SSE_PIECES = ["data: ", "data:", "data:  ", "event: x", ": comment", "[DONE]", '{"a":1}', "\n", "\n\n", "\r\n",
               " ", "id: 7", "xdata: 1", "data", "\t", "\r"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_SSE_PIECES) | st.text(max_size=6), max_size=40))
def test_sse_payloads_are_the_data_lines_a_multiline_regex_finds(pieces: list[str]) -> None:
    """The stream's ``data:`` values, split at newlines, are exactly those of ``^data:([^\\n]*)``
    (multi-line) stripped, empty ones and ``[DONE]`` left out, whatever else the stream holds."""
    import re

    from vllm_audit.finalize import _sse_payloads

    body = "".join(pieces).encode()
    ref = [v.strip() for v in re.findall(rb"^data:([^\n]*)", body, re.M)]
    assert _sse_payloads(body) == [v for v in ref if v and v != b"[DONE]"]
