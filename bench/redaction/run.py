"""Precision/recall per entity type and throughput of vllm-audit's recognizers, vs Presidio.

One command: ``.venv/bin/python bench/redaction/run.py`` (``--per-type N --negatives N --seed S``).

The corpus is generated deterministically by ``corpus.py`` (Chinese and English, look-alike
negatives). Presidio (``pip install presidio-analyzer``; bench-only, no spaCy model needed) runs
its pattern recognizers only (e-mail, credit card, IP, US SSN, IBAN: the ones that map to our
types), each called directly with ``analyze(text, entities, nlp_artifacts=None)``; it is skipped
with a message when not installed. Scoring: a prediction is a true positive when it overlaps a
gold span of the same type.

Throughput (CPU time, ``time.process_time``; rounds interleaved, medians reported, since the
machine may be shared): (i) all 15 types vs Presidio's 5, (ii) ours restricted to Presidio's 5
types (``find(text, entities)``), (iii) realistic prompts without PII (``realistic.py``), and the
records/s of ``build_redactor`` (default config) on ~1 KB chat records with 0, 1 and 2 PII values.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adversarial import variants
from corpus import SEED, generate
from realistic import prompts, records

from vllm_audit.config import Config
from vllm_audit.privacy.recognizers import find
from vllm_audit.privacy.redactor import build_redactor

Span = tuple[int, int, str]
CHECKSUMMED = ("CN_ID", "BANK_CARD", "CREDIT_CARD", "CN_USCC", "IBAN")
PRESIDIO_MAP = {"EMAIL_ADDRESS": "EMAIL", "CREDIT_CARD": "CREDIT_CARD", "IP_ADDRESS": "IP_ADDRESS",
                "US_SSN": "US_SSN", "IBAN_CODE": "IBAN"}  # fmt: skip
PRESIDIO_TYPES = frozenset(PRESIDIO_MAP.values())


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


if "entities" in inspect.signature(find).parameters:

    def ours_restricted(text: str) -> list[Span]:
        return [(a, b, t) for a, b, t, _ in find(text, PRESIDIO_TYPES)]

else:  # an older find() without the parameter (for before/after runs): filter its output

    def ours_restricted(text: str) -> list[Span]:
        return [(a, b, t) for a, b, t, _ in find(text) if t in PRESIDIO_TYPES]


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
    """Median MB/s (CPU time) of each predictor; rounds are interleaved so load affects all alike."""
    size = sum(len(t.encode()) for t in texts)
    speeds: list[list[float]] = [[] for _ in predictors]
    for _ in range(rounds):
        for i, predict in enumerate(predictors):
            t0 = time.process_time()
            for t in texts:
                predict(t)
            speeds[i].append(size / max(time.process_time() - t0, 1e-9) / 1e6)
    return [statistics.median(s) for s in speeds]


def records_per_second(pii: int, rounds: int = 7, n: int = 400, size: int = 1000) -> float:
    """Median records/s of ``build_redactor`` (default config) on realistic chat records.

    Every round gets records of its own seed (new request ids and texts), so no cache inside the
    redactor can serve a round from an earlier one.
    """
    redact = build_redactor(Config())
    speeds: list[float] = []
    for k in range(rounds):
        batch = records(seed=1000 * (k + 1) + 11 + pii, n=n, pii=pii, size=size)
        t0 = time.process_time()
        for r in batch:
            redact(r)
        speeds.append(n / max(time.process_time() - t0, 1e-9))
    return statistics.median(speeds)


def score_split(items: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Values cut into two message parts: a record per item, scored by the redactor's entity counts."""
    redact = build_redactor(Config())
    stats: dict[str, Counter[str]] = {}
    for item in items:
        [(_, _, gold)] = item["entities"]
        rec = redact({"org_id": "x", "input_prompt": [{"role": "user", "content": p} for p in item["parts"]]})
        counts = dict(rec["redaction"]["entities"])
        hit = counts.get(gold, 0) >= 1
        stats.setdefault(gold, Counter())["tp" if hit else "fn"] += 1
        counts[gold] = counts.get(gold, 0) - (1 if hit else 0)
        for t, n in counts.items():
            if n > 0:
                stats.setdefault(t, Counter())["fp"] += n
    return stats


def adversarial(seed: int, per_type: int, negatives: int) -> bool:
    """Precision/recall per type on adversarial variants of a held-out corpus; True when recall >= 99 %."""
    held = generate(seed, per_type, negatives)
    print(f"\nadversarial variants of a held-out corpus (seed {seed}; the recognizers were written against "
          f"seed {SEED})")
    ok = True
    for name, items in variants(held, seed).items():
        stats = score_split(items) if name == "split" else score(items, ours)
        types = sorted({t for i in items for _, _, t in i["entities"]} | set(stats))
        table(f"variant: {name} ({len(items)} texts)", stats, types)
        tp = sum(c["tp"] for c in stats.values())
        fn = sum(c["fn"] for c in stats.values())
        ok &= tp / max(tp + fn, 1) >= 0.99
    return ok


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
    parser.add_argument("--holdout-seed", type=int, default=777, help="seed of the held-out corpus")
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
    clean = prompts()
    pres = presidio()
    if pres is not None:
        table("Presidio pattern recognizers (email, credit card, IP, US SSN, IBAN)", score(items, pres), types)
    predictors = (ours, ours_restricted) if pres is None else (ours, ours_restricted, pres)
    one = throughput(texts, *predictors)
    fifty = throughput(big, *predictors, rounds=5)
    prose = throughput(clean, *predictors, rounds=5)
    print("\nthroughput, MB/s of CPU time (median of interleaved rounds)")
    print(f"{'':34}{'one text/call':>15}{'50 texts/call':>15}{'no-PII prompts':>16}")
    names = ["vllm-audit, 15 types", "vllm-audit, Presidio's 5 types", "Presidio, 5 types"]
    for i in range(len(predictors)):
        print(f"{names[i]:34}{one[i]:>15.2f}{fifty[i]:>15.2f}{prose[i]:>16.2f}")
    if pres is not None:
        print(f"{'ratio (i) 15 types / Presidio':34}{one[0] / one[2]:>14.1f}x{fifty[0] / fifty[2]:>14.1f}x"
              f"{prose[0] / prose[2]:>15.1f}x")
        print(f"{'ratio (ii) 5 types / Presidio':34}{one[1] / one[2]:>14.1f}x{fifty[1] / fifty[2]:>14.1f}x"
              f"{prose[1] / prose[2]:>15.1f}x")
        ok &= min(one[0] / one[2], fifty[0] / fifty[2]) >= 20
    held = generate(args.holdout_seed, args.per_type, args.negatives)
    table(f"vllm-audit recognizers, held-out corpus (seed {args.holdout_seed})", score(held, ours), types)
    if pres is not None:
        table("Presidio, held-out corpus", score(held, pres), types)
    ok &= adversarial(args.holdout_seed, args.per_type, 0)
    rps = [records_per_second(pii) for pii in (0, 1, 2)]
    print(f"\nbuild_redactor (default config), ~1 KB chat records (every v1 field): {rps[0]:,.0f} records/s "
          f"without PII, {rps[1]:,.0f} with 1 PII value, {rps[2]:,.0f} with 2 (CPU time, one core)")
    us2k = 1e6 / records_per_second(0, size=2000)
    print(f"clean ~2 KB record: {us2k:.1f} us per record (target <= 25 us)")
    ok &= rps[0] >= 50_000 and us2k <= 25
    print(f"\ntargets (checksummed types P>=98% R>=99%, >=20x Presidio on the PII corpus, >=50k records/s "
          f"without PII, clean 2 KB record <= 25 us, adversarial recall >= 99%): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
