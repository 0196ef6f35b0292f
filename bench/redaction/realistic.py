"""Realistic chat prompts without PII (and records with one or two PII values), deterministic.

Typical prompts are English or Chinese prose, code with version strings and timestamps, and
markdown; most contain no PII at all, so this is the redactor's common path.
``prompts(seed, n)`` returns ~1 KB texts; ``records(seed, n, pii)`` returns record dicts shaped like
the core's (chat messages in ``input_prompt``, a string ``output_response``).
"""

from __future__ import annotations

import random
from typing import Any

EN = [
    "Can you explain how the garbage collector decides when to run a full collection?",
    "I am writing a short story about a lighthouse keeper who finds a message in a bottle.",
    "Please summarise the following meeting notes and list the action items for each team.",
    "What are the trade-offs between optimistic and pessimistic locking in a database?",
    "Rewrite this paragraph so that it sounds more formal, but keep it under two hundred words.",
    "The quarterly report shows revenue grew steadily while costs stayed flat over the period.",
    "Translate the text below into French and keep the markdown formatting intact.",
    "Why does my React component render twice when strict mode is enabled in development?",
    "Give me three ideas for a weekend trip near the mountains with kids and a dog.",
    "Our team uses Kubernetes with a Helm chart; the pods restart when memory spikes.",
]
ZH = [
    "请帮我把下面这段话改写得更正式一些，字数控制在两百字以内。",
    "我正在学习机器学习，能不能用通俗的语言解释一下梯度下降的原理？",
    "这篇文章主要讨论了城市交通拥堵的成因以及可能的解决方案。",
    "周末想带孩子去郊外露营，需要准备哪些装备？请列一个清单。",
    "请总结一下会议纪要，并为每个团队列出需要跟进的事项。",
    "我们的服务在高峰期响应变慢，日志里看到很多超时，应该从哪里开始排查？",
    "帮我写一封邮件，邀请合作伙伴参加下个月的产品发布会。",
    "这段代码在本地运行正常，但是部署到服务器上就报错了。",
]
CODE = [
    "def retry(fn, attempts=3, delay=0.5):\n    for i in range(attempts):\n        try:\n"
    "            return fn()\n        except TimeoutError:\n            time.sleep(delay * 2 ** i)\n",
    "requirements: torch==2.3.1, transformers>=4.41.2, numpy 1.26.4, python 3.11.7\n",
    "2025-06-03 14:22:51,093 INFO [worker-7] batch 1284 done in 312 ms (p99 845 ms)\n",
    "[2025-06-03T14:22:51.093Z] GET /v1/models 200 12ms\n",
    "for (let i = 0; i < items.length; i++) { total += items[i].price * 1.08; }\n",
    "ERROR: could not resolve host, retrying in 30s (attempt 2 of 5) at line 217\n",
    "  File \"/usr/lib/python3.11/asyncio/base_events.py\", line 653, in run_until_complete\n",
    "SELECT id, created_at FROM orders WHERE status = 'paid' LIMIT 100 OFFSET 2000;\n",
    "std::vector<int> v(16); auto it = std::find(v.begin(), v.end(), 42);\n",
]
PII = ["13812345678", "bob.smith@example.com", "110101199003077578", "6222021234567890128", "192.168.31.20",
       "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789"]  # fmt: skip


def prompt(rng: random.Random, size: int = 1000) -> str:
    """One ~``size``-character prompt: prose (English or Chinese) mixed with code and logs."""
    zh = rng.random() < 0.4
    parts: list[str] = []
    n = 0
    while n < size:
        pool = CODE if rng.random() < 0.25 else (ZH if zh else EN)
        s = rng.choice(pool)
        parts.append(s)
        n += len(s.encode()) if not zh else len(s) * 2
    return (" " if not zh else "").join(parts)


def prompts(seed: int = 7, n: int = 200) -> list[str]:
    """``n`` realistic prompts without PII."""
    rng = random.Random(seed)
    return [prompt(rng) for _ in range(n)]


def records(seed: int = 7, n: int = 200, pii: int = 0, size: int = 1000) -> list[dict[str, Any]]:
    """Chat records (~``size`` bytes of text, full v1 fields) with ``pii`` PII values in the user message."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        text = prompt(rng, size * 7 // 10)
        for _ in range(pii):
            cut = text.find(" ", rng.randrange(len(text)))
            cut = len(text) if cut < 0 else cut
            text = f"{text[:cut]} {rng.choice(PII)} {text[cut:]}"
        rid = f"{rng.getrandbits(128):032x}"
        rid = f"{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:]}"
        out.append({
            "seq": i, "writer_id": "w1", "record_type": "inference", "schema_version": 1,
            "timestamp": "2026-01-01T00:00:00.000Z", "request_id": rid, "request_id_source": "client",
            "client_ip": "203.0.113.7", "peer_ip": "10.0.0.2", "forwarded_ignored": False,
            "org_id": "acme", "user_id": "alice", "auth_status": "authenticated", "auth_method": "api_key",
            "key_id": "key-1", "roles": ["user"], "method": "POST", "route": "/v1/chat/completions",
            "model_name": "qwen2.5-7b-instruct", "model_revision": None, "response_id": f"chatcmpl-{rid}",
            "stream": True, "http_status": 200, "status": "ok", "finish_reason": "stop",
            "prompt_tokens": 250, "completion_tokens": 80, "total_tokens": 330, "usage_source": "injected",
            "latency_ms": 812.5, "ttft_ms": 41.0,
            "input_prompt": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": text}],
            "output_response": prompt(rng, size * 3 // 10), "prompt_sha256": None, "request_bytes": size + 200,
            "response_bytes": 4000, "request_truncated": False, "response_truncated": False,
            "upstream": "http://127.0.0.1:8000", "error_type": None, "error_message": None,
        })  # fmt: skip
    return out
