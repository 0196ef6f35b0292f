"""Train the local classifier and write ``model/weights.npy`` + ``model/model.json``.

    pip install 'vllm-audit[detect-train]'      # bastioncorpus, jailbreak-corpus-mini-py
    python -m vllm_audit.detect.train [--check]

Data (docs/detection.md has the data card): ``bastioncorpus`` 0.6.0 ``corpus/injections.jsonl``
(181 rows, en/de/fr/es/it, malicious + benign traps), ``jailbreak-corpus-mini-py`` 0.1.0 (15
attacks, en), and this package's ``data/`` files written for this project: 60 Chinese attacks,
60 Chinese benign prompts (including benign ones that talk about SQL, system prompts and
jailbreaks), 50 English benign prompts. The held-out test split (30 %, stratified by language
and label, seed fixed) is made first and never looked at while choosing anything: the operating
threshold is chosen on a validation split carved out of the training part. ``--check`` retrains
and fails when the figures differ from the committed ``model.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vllm_audit.detect.classifier import Classifier, features

NGRAMS = (1, 2, 3, 4)
BITS = 17
L2 = 1e-4
EPOCHS = 300
SEED = 12
MODEL_DIR = Path(__file__).parent / "model"


def _lang_group(lang: str) -> str:
    return lang if lang in ("en", "zh") else "other"


def dataset() -> list[tuple[str, int, str, str]]:
    """``(text, label 1 = attack, language, source)`` rows from every source of the data card."""
    import bastioncorpus  # type: ignore[import-untyped]

    rows: list[tuple[str, int, str, str]] = []
    corpus = Path(bastioncorpus.__file__).parent / "corpus" / "injections.jsonl"
    for line in corpus.read_text("utf-8").splitlines():
        r = json.loads(line)
        rows.append((r["text"], int(r["label"] == "malicious"), r["lang"], "bastioncorpus"))
    mini = json.loads(resources.files("jailbreak_corpus_mini").joinpath("corpus.json").read_text("utf-8"))
    rows += [(r["prompt"], 1, "en", "jailbreak-corpus-mini") for r in mini]
    data = resources.files("vllm_audit.detect").joinpath("data")
    for name, label, lang in (("zh_malicious.txt", 1, "zh"), ("zh_benign.txt", 0, "zh"), ("en_benign.txt", 0, "en")):
        for text in data.joinpath(name).read_text("utf-8").splitlines():
            if text.strip():
                rows.append((text.strip(), label, lang, f"vllm-audit/{name}"))
    return rows


def split(rows: Sequence[tuple[str, int, str, str]], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (language group x label) index split: ``(rest, held out)``."""
    rng = random.Random(seed)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (_, label, lang, _) in enumerate(rows):
        groups.setdefault((_lang_group(lang), label), []).append(i)
    rest, held = [], []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * frac))
        held += idx[:k]
        rest += idx[k:]
    return sorted(rest), sorted(held)


def _design(texts: Sequence[str]) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    return [features(t, NGRAMS, BITS) for t in texts]


def fit(texts: Sequence[str], labels: Sequence[int]) -> Classifier:
    """L2-regularised logistic regression by full-batch gradient descent with Adam."""
    X = _design(texts)
    y = np.asarray(labels, dtype=np.float64)
    d = 1 << BITS
    w = np.zeros(d)
    b = 0.0
    m = np.zeros(d)
    v = np.zeros(d)
    mb = vb = 0.0
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    pos = y.mean()
    cw = np.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
    for t in range(1, EPOCHS + 1):
        z = np.array([float(np.dot(w[i], x)) for i, x in X]) + b
        p = 1 / (1 + np.exp(-z))
        r = (p - y) * cw / len(y)
        g = L2 * w
        for (i, x), ri in zip(X, r, strict=True):
            g[i] += ri * x
        gb = float(r.sum())
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        mb = b1 * mb + (1 - b1) * gb
        vb = b2 * vb + (1 - b2) * gb * gb
        b -= lr * (mb / (1 - b1**t)) / (np.sqrt(vb / (1 - b2**t)) + eps)
    return Classifier(w.astype(np.float16).astype(np.float32), float(b), NGRAMS, BITS)


def prf(probs: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, float]:
    tp = sum(1 for p, y in zip(probs, labels, strict=True) if p >= threshold and y)
    fp = sum(1 for p, y in zip(probs, labels, strict=True) if p >= threshold and not y)
    fn = sum(1 for p, y in zip(probs, labels, strict=True) if p < threshold and y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3),
            "n": len(labels), "attacks": int(sum(labels))}


def train() -> tuple[Classifier, dict[str, Any]]:
    rows = dataset()
    train_idx, test_idx = split(rows, 0.3, SEED)
    # The threshold is chosen on a validation part of the training rows, never on the test rows.
    sub = [rows[i] for i in train_idx]
    fit_idx, val_idx = split(sub, 0.25, SEED + 1)
    model = fit([sub[i][0] for i in fit_idx], [sub[i][1] for i in fit_idx])
    vp = model.predict([sub[i][0] for i in val_idx])
    vy = [sub[i][1] for i in val_idx]
    threshold = max((prf(vp, vy, t)["f1"], -abs(t - 0.5), t) for t in np.arange(0.2, 0.96, 0.05))[2]
    threshold = round(float(threshold), 2)
    # Refit on every training row with the chosen threshold, then measure once on the test rows.
    model = fit([rows[i][0] for i in train_idx], [rows[i][1] for i in train_idx])
    tp = model.predict([rows[i][0] for i in test_idx])
    report: dict[str, Any] = {"threshold": threshold, "test": {}}
    for lang in ("en", "zh", "other", "all"):
        sel = [k for k, i in enumerate(test_idx) if lang == "all" or _lang_group(rows[i][2]) == lang]
        report["test"][lang] = prf([tp[k] for k in sel], [rows[test_idx[k]][1] for k in sel], threshold)
    report["rows"] = {"train": len(train_idx), "test": len(test_idx)}
    return model, report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="retrain and compare with the committed figures")
    args = ap.parse_args(argv)
    model, report = train()
    meta = {"format": "vllm-audit-ngram-logreg/v1", "ngrams": list(NGRAMS), "bits": BITS,
            "bias": model.bias, **report}
    if args.check:
        committed = json.loads((MODEL_DIR / "model.json").read_text("utf-8"))
        same = committed.get("test") == report["test"]
        print(json.dumps(report, indent=2))
        return 0 if same else 1
    MODEL_DIR.mkdir(exist_ok=True)
    np.save(MODEL_DIR / "weights.npy", model.weights.astype(np.float16), allow_pickle=False)
    (MODEL_DIR / "model.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
