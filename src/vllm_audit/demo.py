"""The built-in demo engine: a small simulated OpenAI-compatible model server (ASGI).

It makes ``vllm-audit serve`` work on a fresh machine with nothing else running, and gives the
tests and the benchmark a fast, deterministic upstream. It behaves like vLLM where it matters to
an audit: ``chatcmpl-<request id>`` ids from ``X-Request-Id``, usage counts, a usage-only final
stream chunk when ``stream_options.include_usage`` is set (usage on every chunk with
``continuous_usage_stats``), ``system_fingerprint`` on each finish chunk or on the usage chunk,
``n`` choices, the same JSON parser and lax field coercion, OpenAI-shaped errors.

The reply echoes the last user message ("You said: ..."), padded with filler words up to
``max_tokens``; long words are split into pieces of at most 4 characters, one per token, so a
value in the prompt reaches the client split across several stream events. A prompt containing
``[[demo:error]]`` makes it answer 500; ``[[demo:hang]]`` makes it stall mid-stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any

import orjson

from vllm_audit._asgi import lifespan, send_bytes, until_disconnect
from vllm_audit.capture import lax_bool, lax_int, parse_json
from vllm_audit.config import GatewayConfig
from vllm_audit.types import Receive, Scope, Send

_PIECE = re.compile(r"\s*\S{1,4}|\s+")
_FILLER = "the quick brown fox jumps over a lazy dog while auditors verify every record ".split()
_JSON_HDR = [(b"content-type", b"application/json")]
_SSE_HDR = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
FINGERPRINT = "demo-rev-1"
#: Longest generation (like vLLM's max_model_len): larger max_tokens get 400, so one request
#: cannot make the engine build an unbounded answer.
MAX_MODEL_LEN = 4096
MAX_N = 8


def tokens_of(text: str) -> list[str]:
    return _PIECE.findall(text)


class DemoEngine:
    """OpenAI-compatible simulated model: models, chat, completions, embeddings, responses."""

    def __init__(self, config: GatewayConfig | None = None) -> None:
        cfg = config or GatewayConfig()
        self.model = cfg.demo_model
        self.delay = cfg.demo_token_delay_ms / 1000.0
        self.created = int(time.time())
        self._models = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": self.created, "owned_by": "vllm-audit-demo"}],
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover
            return
        path = scope["path"]
        method = scope["method"]
        if method == "GET":
            if path == "/v1/models":
                await send_bytes(send, 200, self._models)
            elif path in ("/health", "/ping"):
                await send_bytes(send, 200, b"{}")
            else:
                await _error(send, 404, f"Not found: {path}", "not_found")
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        req, error = parse_json(body)
        if error is not None:
            await _error(send, 400, f"Invalid JSON body: {error}.", "invalid_json")
            return
        if not isinstance(req, dict):
            await _error(send, 400, "The request body must be a JSON object.", "invalid_request")
            return
        rid = "demo"
        for n, v in scope["headers"]:
            if n == b"x-request-id":
                rid = v.decode("latin-1")
        model = req.get("model", self.model)
        if path not in ("/tokenize", "/detokenize") and model != self.model:
            await _error(send, 404, f"The model `{model}` does not exist.", "model_not_found")
            return
        if path == "/v1/chat/completions":
            await self._generate(send, receive, req, rid, chat=True)
        elif path == "/v1/completions":
            await self._generate(send, receive, req, rid, chat=False)
        elif path == "/invocations":
            await self._generate(send, receive, req, rid, chat="messages" in req)
        elif path == "/v1/embeddings":
            await self._embeddings(send, req)
        elif path == "/v1/responses":
            await self._responses(send, req, rid)
        elif path == "/tokenize":
            text = req.get("prompt") or ""
            toks = tokens_of(str(text))
            await send_bytes(
                send, 200, orjson.dumps({"count": len(toks), "max_model_len": 4096, "tokens": list(range(len(toks)))})
            )
        else:
            await _error(send, 404, f"Not found: {path}", "not_found")

    # -- generation -------------------------------------------------------------------------

    def _prompt(self, req: dict[str, Any], chat: bool) -> tuple[str, int] | str:
        if chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return "`messages` must be a non-empty array."
            last = ""
            n = 0
            for m in msgs:
                if not isinstance(m, dict):
                    return "Each message must be an object."
                content = m.get("content")
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                content = content if isinstance(content, str) else ""
                n += len(tokens_of(content)) + 4
                if m.get("role") == "user":
                    last = content
            return last, n + 2
        prompt = req.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        if not isinstance(prompt, str):
            return "`prompt` must be a string."
        return prompt, len(tokens_of(prompt))

    async def _generate(self, send: Send, receive: Receive, req: dict[str, Any], rid: str, chat: bool) -> None:
        got = self._prompt(req, chat)
        if isinstance(got, str):
            await _error(send, 400, got, "invalid_request")
            return
        prompt, prompt_tokens = got
        prompt = prompt.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (json.loads keeps them)
        if "[[demo:error]]" in prompt:
            await _error(send, 500, "Simulated engine failure.", "internal_error", "server_error")
            return
        raw_max = req.get("max_tokens") or req.get("max_completion_tokens")
        max_tokens = lax_int(raw_max) if raw_max is not None else None
        if raw_max is not None and (max_tokens is None or max_tokens < 1):
            await _error(send, 400, "`max_tokens` must be a positive integer.", "invalid_request")
            return
        if max_tokens is not None and max_tokens > MAX_MODEL_LEN:
            await _error(send, 400, f"`max_tokens` must be at most {MAX_MODEL_LEN}.", "invalid_request")
            return
        n = lax_int(req.get("n", 1)) if req.get("n") is not None else 1
        if n is None or not 1 <= n <= MAX_N:
            await _error(send, 400, f"`n` must be an integer from 1 to {MAX_N}.", "invalid_request")
            return
        toks = tokens_of("You said: " + prompt)[:MAX_MODEL_LEN]
        if max_tokens is not None:
            i = 0
            while len(toks) < max_tokens:
                toks.append(" " + _FILLER[i % len(_FILLER)])
                i += 1
            finish = "length" if len(toks) > max_tokens else "stop"
            toks = toks[:max_tokens]
        else:
            finish = "stop"
        completion_tokens = len(toks) * n
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        created = int(time.time())
        kind = "chatcmpl" if chat else "cmpl"
        rid_full = f"{kind}-{rid}"
        if lax_bool(req.get("stream")):
            opts = req.get("stream_options")
            include_usage = isinstance(opts, dict) and lax_bool(opts.get("include_usage"))
            continuous = include_usage and isinstance(opts, dict) and lax_bool(opts.get("continuous_usage_stats"))
            stream = self._stream(
                send, toks, chat, rid_full, created, finish, usage if include_usage else None, prompt, n, continuous
            )
            await until_disconnect(stream, receive)
            return
        text = "".join(toks)
        if self.delay:
            await asyncio.sleep(self.delay * len(toks))
        choices: list[dict[str, Any]] = []
        for i in range(n):
            if chat:
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            choices.append(choice)
        obj = "chat.completion" if chat else "text_completion"
        payload = {
            "id": rid_full,
            "object": obj,
            "created": created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": FINGERPRINT,
        }
        await send_bytes(send, 200, orjson.dumps(payload))

    async def _stream(
        self,
        send: Send,
        toks: list[str],
        chat: bool,
        rid: str,
        created: int,
        finish: str,
        usage: dict[str, int] | None,
        prompt: str,
        n: int = 1,
        continuous: bool = False,
    ) -> None:
        """vLLM's chunk shapes: one choice per chunk; the fingerprint on each finish chunk, or only
        on the final usage chunk when usage is on; with continuous usage, usage on every chunk."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.model}
        dumps = orjson.dumps
        prompt_tokens = usage["prompt_tokens"] if usage else 0
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HDR})

        async def event(payload: dict[str, Any], done: int | None = None) -> None:
            if continuous and done is not None:
                payload["usage"] = {
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens + done,
                    "completion_tokens": done,
                }
            await send({"type": "http.response.body", "body": b"data: " + dumps(payload) + b"\n\n", "more_body": True})

        if chat:
            for i in range(n):
                await event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]}, 0)
        hang = "[[demo:hang]]" in prompt
        for t, tok in enumerate(toks[:-1] if toks else toks):
            if self.delay:
                await asyncio.sleep(self.delay)
            if hang and t == len(toks) // 2:
                await asyncio.sleep(3600)
            for i in range(n):
                choice: dict[str, Any] = {"index": i, "delta": {"content": tok}} if chat else {"index": i, "text": tok}
                await event({**head, "choices": [choice]}, t + 1)
        last_tok = toks[-1] if toks else ""
        for i in range(n):
            # Like vLLM: the last token rides on the finish chunk.
            last: dict[str, Any] = {"index": i}
            if chat:
                last["delta"] = {"content": last_tok} if last_tok else {}
            else:
                last["text"] = last_tok
            last["finish_reason"] = finish
            chunk: dict[str, Any] = {**head, "choices": [last]}
            if usage is None:
                chunk["system_fingerprint"] = FINGERPRINT
            await event(chunk, len(toks))
        if usage is not None:
            await event({**head, "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _embeddings(self, send: Send, req: dict[str, Any]) -> None:
        inp = req.get("input")
        items = inp if isinstance(inp, list) else [inp]
        if not items or not all(isinstance(x, str | int | list) for x in items):
            await _error(send, 400, "`input` must be a string or an array.", "invalid_request")
            return
        data = []
        n_tokens = 0
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else str(item)
            n_tokens += len(tokens_of(text))
            digest = hashlib.sha256(text.encode()).digest()
            vec = [round((b - 128) / 128.0, 4) for b in digest[:16]]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        payload = {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }
        await send_bytes(send, 200, orjson.dumps(payload))

    async def _responses(self, send: Send, req: dict[str, Any], rid: str) -> None:
        inp = req.get("input")
        if isinstance(inp, list):
            inp = " ".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in inp)
        if not isinstance(inp, str):
            await _error(send, 400, "`input` must be a string or an array.", "invalid_request")
            return
        toks = tokens_of("You said: " + inp)
        text = "".join(toks)
        usage = {"input_tokens": len(tokens_of(inp)), "output_tokens": len(toks)}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        resp = {
            "id": f"resp_{rid}",
            "object": "response",
            "created_at": int(time.time()),
            "model": self.model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{rid}",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": usage,
        }
        if lax_bool(req.get("stream")):
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HDR})
            events: list[dict[str, Any]] = [
                {"type": "response.created", "response": {**resp, "status": "in_progress", "output": []}}
            ]
            events += [{"type": "response.output_text.delta", "delta": t} for t in toks]
            events.append({"type": "response.completed", "response": resp})
            for ev in events:
                body = b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send_bytes(send, 200, orjson.dumps(resp))


async def _error(send: Send, status: int, message: str, code: str, type_: str = "invalid_request_error") -> None:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    await send_bytes(send, status, body)
