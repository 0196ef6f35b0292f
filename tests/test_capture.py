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
    """The prepare processes receive exchanges pickled as one tuple: every slot comes back, a new
    slot too; the chunks come joined and the path's parse of the request is left out."""
    import pickle

    ex = Exchange("rid-p", "POST", "/v1/chat/completions")
    for i, name in enumerate(Exchange.__slots__):
        setattr(ex, name, (name, i))  # a distinct value per slot
    ex.chunks = [b"a", b"b"]
    back = pickle.loads(pickle.dumps([ex, ex], protocol=pickle.HIGHEST_PROTOCOL))
    assert back[0] is back[1]  # shared within one batch, as pickle memoises
    sent = {"chunks": [b"ab"], "request_json": None, "request_parse_error": None}
    assert [sent.get(name, (name, i)) for i, name in enumerate(Exchange.__slots__)] == [
        getattr(back[0], name) for name in Exchange.__slots__
    ]
    assert ex.chunks == [b"a", b"b"] and ex.request_json == ("request_json", 17)  # the original is untouched


def test_a_pickled_exchange_finalizes_to_the_same_record() -> None:
    """Parsed on the path or not, one chunk or many, lone surrogates or malformed JSON: the record
    a prepare process makes from the pickled exchange is the one the writer thread would make."""
    import pickle

    from vllm_audit.capture import parse_json

    bodies = [
        b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        b'{"model": "m", "stream": true, "messages": [{"content": NaN}]}',
        b'{"model": "m", "stream": tru',
        b'{"model": "m", "stream": false, "prompt": "x"}',
    ]
    chunks = [b'data: {"id":"r","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"]
    for body in bodies:
        for parsed in (False, True):
            ex = exchange("/v1/chat/completions", None, list(chunks), b"text/event-stream")
            ex.request_body, ex.request_bytes = body, len(body)
            if parsed:
                ex.request_json, ex.request_parse_error = parse_json(body)
            ex.t_end = ex.t0 + 0.25
            copy = pickle.loads(pickle.dumps(ex))
            assert len(copy.chunks) == 1 and copy.request_json is None
            assert finalize(ex) == finalize(copy)


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


_TOP = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
_HEAD = _TOP + b'"choices":[{"index":0,"delta":{"content":'
#: What may stand where a template chunk's content literal stands: strings the fast path must
#: read as orjson does, and bytes that are no single JSON string (the chunk is then parsed whole).
_LITERALS = [b'"a\\"', b'","b"', b'"\\ud800"', b'"x"  ', b' "x"', b'"\\u0041"', b'"\x01"', b"123", b"null",
             b'"a"}', b'"a","b":"c"', b'""', b'"\\\\"', b'"\\"', b'"a\\u00e9\\ud83d\\ude00"', b'"caf\xc3\xa9"',
             b'"\xff"', b"[]", b'"a"}}],"usage":{"prompt_tokens":1},"x":{"y":"', b'{}']  # fmt: skip
_TAILS = [b"}}]}", b'},"logprobs":null,"finish_reason":null}]}', b'},"finish_reason":"stop"}]}', b"}}]} ",
          b'}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}', b'}}],"system_fingerprint":"fp"}',
          b"}]}"]  # fmt: skip


def _sse(payloads: list[bytes]) -> bytes:
    """An event stream of these payloads, as vLLM frames them (``data: `` and a blank line)."""
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def _template_obj(text: str, extra: dict[str, object]) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, **extra}]}  # fmt: skip


_CMPL_HEAD = b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":'
_CMPL_TAILS = [b',"logprobs":null,"finish_reason":null}]}', b"}]}", b',"finish_reason":"length"}]}']


def _completion_obj(text: str) -> dict[str, object]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}  # fmt: skip


_CHUNK = st.one_of(
    st.text(max_size=8).map(lambda t: orjson.dumps(_completion_obj(t))),
    st.tuples(st.sampled_from(_LITERALS), st.sampled_from(_CMPL_TAILS)).map(lambda lt: _CMPL_HEAD + lt[0] + lt[1]),
    st.text(max_size=8).map(lambda t: orjson.dumps(_template_obj(t, {}))),
    st.text(max_size=8).map(lambda t: orjson.dumps(_template_obj(t, {"logprobs": None, "finish_reason": None}))),
    st.tuples(st.sampled_from(_LITERALS), st.sampled_from(_TAILS)).map(lambda lt: _HEAD + lt[0] + lt[1]),
    st.tuples(st.text(max_size=4), st.sampled_from(_TAILS)).map(lambda tt: _HEAD + orjson.dumps(tt[0]) + tt[1]),
    st.sampled_from([
        _TOP + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        b'{"id":"chatcmpl-2","model":"m2","choices":[{"index":0,"delta":{"content":"z"}}],"system_fingerprint":"fp2"}',
        _TOP + b'"choices":[{"index":1,"delta":{"content":"one"}}]}',
        _TOP + b'"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}',
        _TOP.replace(b",", b", ", 1) + b'"choices":[{"index":0,"delta":{"content":"sp"}}]}',
        _TOP + b'"choices":[{"index":0,"delta":{"\\u0063ontent":"esc"}}]}',
        _TOP + b'"model":"dup","choices":[{"index":0,"delta":{"content":"d"}}]}',
        _TOP + b'"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}',
        _TOP + b'"choices":[{"index":0,"delta":{"content":"f"},"finish_reason":"length"}]}',
        _TOP + b'"choices":[],"usage":{"prompt_tokens":5,"total_tokens":9}}',
        _TOP + b'"choices":[{"index":0,"delta":{"content":"t"}}],"created":{"a":1}}',
        b'{"error":{"type":"overloaded","message":"later"}}',
        _TOP + b'"choices":[{"index":0,"delta":{"content":"tr',
        b"[1,2]", b"not json",
    ]),
)  # fmt: skip


#: How an event may be framed: vLLM's (most of the draws), and what other servers or a proxy write.
_FRAMES = st.one_of(
    st.just((b"data: ", b"\n\n")),
    st.sampled_from([(b"data:", b"\n\n"), (b"data: ", b"\r\n\r\n"), (b"data: ", b"\n"), (b"data: ", b"\n\n\n"),
                     (b": ping\n\ndata: ", b"\n\n"), (b"data: ", b"  \n\n"), (b"event: x\ndata: ", b"\n\n"),
                     (b"data:  ", b"\n\n"), (b"data: ", b"\n\ndata: \n\n"), (b"data: ", b"\ndata: [DONE]\n\n")]),
)  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(st.lists(st.tuples(_CHUNK, _FRAMES), max_size=24), st.booleans(), st.sampled_from([b"", b"\n", b"\n\n\n"]))
def test_template_chunks_give_the_record_parsing_every_chunk_gives(
    chunks: list[tuple[bytes, tuple[bytes, bytes]]], usage: bool, end: bytes
) -> None:
    """A stream read with template chunks (runs of later chunks that match the template's bytes
    around one JSON string taken as those strings) gives the record parsing every chunk whole
    gives: canonical and non-canonical chunks, escapes, quotes, lone surrogates, invalid UTF-8,
    literals that are no single string, other tails, duplicate keys, other choices, usage, errors,
    each framed as vLLM frames it or otherwise (no space, CRLF, no blank line or more than one,
    comments, other fields, trailing blanks, empty data lines)."""
    from vllm_audit.finalize import _parse_sse

    body = b"".join(pre + c + post for c, (pre, post) in chunks) + b"data: [DONE]" + end
    usage_chunk = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}' if usage else None
    base = finalize(exchange("/v1/chat/completions", {"model": "req"}, [], b"text/event-stream"))
    fast, slow = dict(base), dict(base)
    _parse_sse(body, usage_chunk, fast)
    _parse_sse(body, usage_chunk, slow, fast=False)
    assert fast == slow


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b'"', b"\\", b"a", b",", b"\n", b"\x01", b"u", b"\xc3", b" "]), max_size=10))
def test_a_single_string_token_is_what_a_string_grammar_matches(parts: list[bytes]) -> None:
    """``_single_string``: a quote, characters other than quotes and control characters or a
    backslash with any byte after it, and a closing quote; the pieces of a run are decoded
    together only then, so that each stands for one string of the array."""
    import re

    from vllm_audit.finalize import _single_string

    for piece in (b"".join(parts), b'"' + b"".join(parts) + b'"'):
        expected = re.fullmatch(rb'"(?:[^"\\\x00-\x1f]|\\.)*"', piece, re.DOTALL) is not None
        assert _single_string(piece) == expected, piece


#: Literals for a run of template chunks: what orjson writes, and what no server should write.
_RUN_LITERALS = st.one_of(
    st.text(max_size=6).map(orjson.dumps),
    st.sampled_from(_LITERALS),
    st.sampled_from([b'"', b'""', b'"\\\\"', b'"a\\\\\\"', b'"a"b"', b'"\n"', b'"\x00"', b'"\\u00"',
                     b'"a\\\\\\""', b'"\\ud83d\\ude00"', b'"\\udc00\\ud800"', b'"\\/"', b'"\\\\\\\\"']),
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(st.lists(_RUN_LITERALS, max_size=16), st.sampled_from(_TAILS), _FRAMES)
def test_runs_of_template_chunks_give_the_record_parsing_every_chunk_gives(
    literals: list[bytes], tail: bytes, frame: tuple[bytes, bytes]
) -> None:
    """A template chunk, then chunks with its bytes around each literal (strings, escapes, pieces
    that are no single string or no valid one, which the run must not decode together with the
    others): the record parsing every chunk whole gives."""
    from vllm_audit.finalize import _parse_sse

    pre, post = frame
    chunks = [_HEAD + b'"T"' + tail] + [_HEAD + lit + tail for lit in literals]
    body = b"".join(b"data: " + c + b"\n\n" for c in chunks[:1]) + b"".join(pre + c + post for c in chunks[1:])
    fast: dict[str, object] = {k: None for k in ("response_id", "model_name", "model_revision", "finish_reason",
                                                  "output_response", "error_type", "error_message", "prompt_tokens",
                                                  "completion_tokens", "total_tokens", "usage_source")}  # fmt: skip
    slow = dict(fast)
    _parse_sse(body, None, fast)
    _parse_sse(body, None, slow, fast=False)
    assert fast == slow


#: Literals that end early, escape their closing quote, hold a raw control character or a quote
#: (decoded together with their neighbours, some would split the run's array in other places), or
#: are one token that orjson refuses (a short or unknown escape, invalid UTF-8, a lone surrogate).
_TRICKY_LITERALS = [b'"', b'""', b'"a\\"', b'"\\\\"', b'"\\\\\\"', b'","', b'"a","b"', b'"a"b"', b'"\x01"',
                    b'"\n"', b'"\\"\\"', b'" "', b'"\\\\\\""', b'"b\\"c"', b'"x"', b'"\\u00"', b'"\xff"',
                    b'"\\ud800"', b'"\\q"']  # fmt: skip


def test_every_short_run_of_tricky_literals_gives_the_record_parsing_every_chunk_gives() -> None:
    """Every run of one to three of the literals above after a template chunk, as vLLM frames
    them: the record parsing every chunk whole gives (a run decoded together only when each of
    its pieces is one string token)."""
    import itertools

    from vllm_audit.finalize import _parse_sse

    keys = ("response_id", "model_name", "model_revision", "finish_reason", "output_response", "error_type",
            "error_message")  # fmt: skip
    for size in (1, 2, 3):
        for run in itertools.product(_TRICKY_LITERALS, repeat=size):
            chunks = [_HEAD + b'"T"}}]}'] + [_HEAD + lit + b"}}]}" for lit in run] + [_HEAD + b'"z"}}]}']
            body = _sse(chunks)
            fast: dict[str, object] = dict.fromkeys(keys)
            slow = dict(fast)
            _parse_sse(body, None, fast)
            _parse_sse(body, None, slow, fast=False)
            assert fast == slow, run


def test_a_vllm_stream_is_read_through_its_template() -> None:
    """A vLLM-shaped stream (role chunk, content chunks, a finish chunk) takes the fast path: every
    content chunk after the first is represented by its text and the first (the template)."""
    from vllm_audit.finalize import _load_stream

    texts = ["Hel", "lo", ' "w"', "\\orld", "\n", "é", ""]
    payloads = [orjson.dumps(_template_obj("", {})).replace(b'{"content"', b'{"role":"assistant","content"')]
    payloads += [orjson.dumps(_template_obj(t, {"logprobs": None, "finish_reason": None})) for t in texts]
    payloads.append(orjson.dumps(_template_obj("!", {"logprobs": None, "finish_reason": "stop"})))
    events = _load_stream(_sse(payloads))
    assert len(events) == 4 and events[2][0] == texts[1:] and isinstance(events[-1], dict)
    template = events[2][1]
    assert template["choices"][0]["delta"] == {"content": "Hel"} and template is events[1]


def test_the_content_chunks_after_a_role_chunk_are_read_through_its_template_without_the_role() -> None:
    """vLLM's first chunk carries the role and an empty content; the chunks after it are that
    chunk without the role and with their text: all of them are read through the first chunk's
    template with its role left out. A server that repeats the role in every chunk gets the
    template of its second chunk, role kept."""
    from vllm_audit.finalize import _load_stream, _parse_sse

    extra: dict[str, object] = {"logprobs": None, "finish_reason": None}
    role = orjson.dumps(_template_obj("", extra)).replace(b'{"content"', b'{"role":"assistant","content"')
    texts = ["Hel", "lo", "!"]
    content = [orjson.dumps(_template_obj(t, extra)) for t in texts]
    events = _load_stream(_sse([role, *content]))
    assert len(events) == 2 and events[1][0] == texts
    assert events[1][1]["choices"][0]["delta"] == {"content": ""}
    repeated = [c.replace(b'{"content"', b'{"role":"assistant","content"') for c in content]
    events = _load_stream(_sse([role, *repeated]))
    assert [type(e) for e in events] == [dict, dict, tuple] and events[2][0] == texts[1:]
    for chunks in ([role, *content], [role, *repeated]):
        fast: dict[str, object] = dict.fromkeys(("response_id", "model_name", "model_revision", "finish_reason",
                                                 "output_response", "error_type", "error_message"))  # fmt: skip
        slow = dict(fast)
        _parse_sse(_sse(chunks), None, fast)
        _parse_sse(_sse(chunks), None, slow, fast=False)
        assert fast == slow and fast["output_response"] == "Hello!"


def _chunk(choice: dict[str, object], **top: object) -> bytes:
    return orjson.dumps({"id": "c", "model": "m", **top, "choices": [choice]})


#: Streams whose first chunk looks like a template but is not one, each followed by chunks with
#: its bytes around another string: read whole, they give another record than taking them as text.
_NOT_TEMPLATES = {
    "the content literal twice (a nested copy before the delta)": [
        _chunk({"index": 0, "x": {"delta": {"content": "zz"}}, "delta": {"content": "zz"}}),
        _chunk({"index": 0, "x": {"delta": {"content": "Q"}}, "delta": {"content": "zz"}}),
    ],
    "duplicate choices (the last one counts)": [
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"x"}}],"choices":[{"index":0,"delta":{"content":"x"}}]}',
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"Q"}}],"choices":[{"index":0,"delta":{"content":"x"}}]}',
    ],
    "a finish reason (set again by each such chunk)": [
        _chunk({"index": 0, "delta": {"content": "a"}, "finish_reason": "length"}),
        orjson.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}),
        _chunk({"index": 0, "delta": {"content": "c"}, "finish_reason": "length"}),
    ],
    "another tail (not JSON)": [
        _chunk({"index": 0, "delta": {"content": "a"}}),
        _chunk({"index": 0, "delta": {"content": "b"}})[:-4] + b"}]]}",
    ],
    "usage (applied again by each such chunk)": [
        _chunk({"index": 0, "delta": {"content": "a"}}, usage={"prompt_tokens": 1}),
        orjson.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 7}}),
        _chunk({"index": 0, "delta": {"content": "b"}}, usage={"prompt_tokens": 1}),
    ],
    "choice 1": [_chunk({"index": 1, "delta": {"content": "a"}}), _chunk({"index": 1, "delta": {"content": "b"}})],
    "two choices": [
        orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]}),
        orjson.dumps({"choices": [{"index": 0, "delta": {"content": "c"}}, {"index": 1, "delta": {"content": "b"}}]}),
    ],
    "an object where the text stands": [
        _chunk({"index": 0, "delta": {"content": "a"}}),
        _chunk({"index": 0, "delta": {"content": "b"}}).replace(b'"b"', b'{"choices":[{"delta":{"content":"INJ"}}]}'),
    ],
    "a chunk between (the record's revision is the last chunk's)": [
        orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        _chunk({"index": 0, "delta": {"content": "a"}}, system_fingerprint="f2"),
        _chunk({"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}, system_fingerprint="f3"),
        _chunk({"index": 0, "delta": {"content": "c"}}, system_fingerprint="f2"),
    ],
    "shapes no chunk has (each checked before it is used)": [
        b'{"choices":[]}', b'{"choices":[5]}', b'{"choices":[{"index":0,"delta":"x"}]}', b'{"choices":{"a":1}}',
        b'"text"', b"[1]", _chunk({"index": 0, "delta": {"content": "a"}}),
    ],
    "a completion chunk with a delta that is no object (its text is read)": [
        orjson.dumps({"choices": [{"index": 0, "delta": "d", "text": "a"}]}),
        orjson.dumps({"choices": [{"index": 0, "delta": "d", "text": "b"}]}),
        orjson.dumps({"choices": [{"index": 0, "delta": {"content": "c"}, "text": "b"}]}),
    ],
    "the sentinel in another field": [
        _chunk({"index": 0, "delta": {"content": "a"}}, id="\x00vllm-audit template content\x00"),
        _chunk({"index": 0, "delta": {"content": "b"}}, id="\x00vllm-audit template content\x00"),
    ],
}  # fmt: skip


def test_chunks_that_are_no_template_are_read_whole() -> None:
    """Each near-template above: the record is the one parsing every chunk whole gives, and its
    texts are all in it (none replaced by a later chunk's text)."""
    from vllm_audit.finalize import _parse_sse

    for name, chunks in _NOT_TEMPLATES.items():
        body = b"".join(b"data: " + c + b"\n\n" for c in chunks)
        fast: dict[str, object] = {k: None for k in ("response_id", "model_name", "model_revision", "finish_reason",
                                                      "output_response", "error_type", "error_message")}  # fmt: skip
        slow = dict(fast)
        _parse_sse(body, None, fast)
        _parse_sse(body, None, slow, fast=False)
        assert fast == slow, name


def test_a_stream_whose_chunks_match_no_template_is_parsed_in_one_call_after_a_few() -> None:
    """Chunks that differ in more than their text (here each its own ``created``) are each a
    template no later chunk matches: after ``_TEMPLATE_SEARCH`` of them in a row the rest is
    parsed as one array, so a later pair that would match is parsed whole too."""
    from vllm_audit.finalize import _TEMPLATE_SEARCH, _load_stream

    payloads = [_chunk({"index": 0, "delta": {"content": f"t{i}"}}, created=i) for i in range(_TEMPLATE_SEARCH)]
    payloads += [_chunk({"index": 0, "delta": {"content": t}}, created=99) for t in ("a", "b", "c")]
    events = _load_stream(_sse(payloads))
    assert events == [orjson.loads(p) for p in payloads]  # dicts only: no chunk taken as a text
    # one chunk fewer before the pair: the pair is read through its template
    assert _load_stream(_sse(payloads[1:]))[-1][0] == ["b", "c"]


def test_a_completions_stream_is_read_through_its_template() -> None:
    """``/v1/completions`` chunks (a choice's ``text``, no delta) take the same path."""
    from vllm_audit.finalize import _load_stream

    texts = ["Once", " upon", ' "a"', " time"]
    events = _load_stream(_sse([orjson.dumps(_completion_obj(t)) for t in texts]))
    assert isinstance(events[0], dict) and len(events) == 2 and events[1][0] == texts[1:]
