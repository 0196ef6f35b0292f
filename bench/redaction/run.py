"""Precision/recall per entity type and throughput of vllm-audit's recognizers, vs Presidio.

One command: ``.venv/bin/python bench/redaction/run.py`` (``--per-type N --negatives N --seed S``).

The corpus is generated deterministically by ``corpus.py`` (Chinese and English, look-alike
negatives). Presidio (``pip install presidio-analyzer``; bench-only, no spaCy model needed) runs
its pattern recognizers only (e-mail, credit card, IP, US SSN, IBAN: the ones that map to our
types), each called directly with ``analyze(text, entities, nlp_artifacts=None)``; it is skipped
with a message when not installed. Scoring: a prediction is a true positive when it overlaps a
gold span of the same type.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import SEED, generate

from vllm_audit.privacy.recognizers import find

Span = tuple[int, int, str]
CHECKSUMMED = ("CN_ID", "BANK_CARD", "CREDIT_CARD", "CN_USCC", "IBAN")
PRESIDIO_MAP = {"EMAIL_ADDRESS": "EMAIL", "CREDIT_CARD": "CREDIT_CARD", "IP_ADDRESS": "IP_ADDRESS",
                "US_SSN": "US_SSN", "IBAN_CODE": "IBAN"}  # fmt: skip


def score(items: list[dict[str, Any]], predict: Callable[[str], list[Span]]) -> dict[str, Counter[str]]:
    stats: dict[str, Counter[str]] = {}
    for item in items:
        gold = [tuple(e) for e in item["entities"]]
        pred = predict(item["text"])
        for a, b, t in pred:
            hit = any(t == gt and a < gb and ga < b for ga, gb, gt in gold)
            stats.setdefault(t, Counter())["tp" if hit else "fp"] += 1
        for ga, gb, gt in gold:
            if not any(t == gt and a < gb and ga < b for a, b, t in pred):
                stats.setdefault(gt, Counter())["fn"] += 1
    return stats


def ours(text: str) -> list[Span]:
    return [(a, b, t) for a, b, t, _ in find(text)]


def presidio() -> Callable[[str], list[Span]] | None:
    try:
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            UsSsnRecognizer,
        )
    except ImportError:
        print("presidio-analyzer is not installed: skipping the comparison (pip install presidio-analyzer)")
        return None
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # offline: falls back to its snapshot
    recognizers = [EmailRecognizer(), CreditCardRecognizer(), IpRecognizer(), UsSsnRecognizer(), IbanRecognizer()]

    def predict(text: str) -> list[Span]:
        out: list[Span] = []
        for rec in recognizers:
            for r in rec.analyze(text, rec.supported_entities, None):
                if r.score >= 0.5 and r.entity_type in PRESIDIO_MAP:
                    out.append((r.start, r.end, PRESIDIO_MAP[r.entity_type]))
        return out

    predict("warm up bob@example.com")
    return predict


def throughput(texts: list[str], *predictors: Callable[[str], Any], rounds: int = 5) -> list[float]:
    """MB/s of each predictor; rounds are interleaved so machine load affects all alike."""
    size = sum(len(t.encode()) for t in texts)
    spent = [0.0] * len(predictors)
    for _ in range(rounds):
        for i, predict in enumerate(predictors):
            t0 = time.perf_counter()
            for t in texts:
                predict(t)
            spent[i] += time.perf_counter() - t0
    return [size * rounds / s / 1e6 for s in spent]


def table(name: str, stats: dict[str, Counter[str]], types: list[str]) -> None:
    print(f"\n{name}\n{'type':<16}{'gold':>6}{'tp':>6}{'fp':>6}{'fn':>6}{'precision':>11}{'recall':>9}")
    for t in types:
        c = stats.get(t, Counter())
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        p = tp / (tp + fp) if tp + fp else float("nan")
        r = tp / (tp + fn) if tp + fn else float("nan")
        print(f"{t:<16}{tp + fn:>6}{tp:>6}{fp:>6}{fn:>6}{p:>11.2%}{r:>9.2%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--per-type", type=int, default=40)
    parser.add_argument("--negatives", type=int, default=300)
    args = parser.parse_args()
    items = generate(args.seed, args.per_type, args.negatives)
    texts = [str(i["text"]) for i in items]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    positives = sum(1 for i in items if i["entities"])
    print(f"corpus: {len(items)} texts ({mb:.2f} MB), seed {args.seed}, {positives} with an entity, "
          f"{len(items) - positives} negatives")
    mine = score(items, ours)
    types = sorted({t for i in items for _, _, t in i["entities"]} | set(mine))
    table("vllm-audit recognizers", mine, types)
    ok = True
    for t in CHECKSUMMED:
        c = mine.get(t, Counter())
        p = c["tp"] / max(c["tp"] + c["fp"], 1)
        r = c["tp"] / max(c["tp"] + c["fn"], 1)
        ok &= p >= 0.98 and r >= 0.99
    big = [" ".join(texts[i : i + 50]) for i in range(0, len(texts), 50)]
    pres = presidio()
    predictors = (ours,) if pres is None else (ours, pres)
    speed = throughput(texts, *predictors)
    speed_big = throughput(big, *predictors, rounds=3)
    print(f"\nthroughput vllm-audit: {speed[0]:.2f} MB/s one text per call, {speed_big[0]:.2f} MB/s 50 texts per call")
    if pres is not None:
        pstats = score(items, pres)
        table("Presidio pattern recognizers (email, credit card, IP, US SSN, IBAN)", pstats, types)
        ratio, ratio_big = speed[0] / speed[1], speed_big[0] / speed_big[1]
        print(f"\nthroughput Presidio (5 types): {speed[1]:.2f} MB/s one text per call, "
              f"{speed_big[1]:.2f} MB/s 50 texts per call")
        print(f"vllm-audit (15 types) is {ratio:.1f}x / {ratio_big:.1f}x faster than Presidio")
        ok &= min(ratio, ratio_big) >= 20
    print(f"\ntargets (checksummed types P>=98% R>=99%, >=20x Presidio): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
