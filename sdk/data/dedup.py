"""Exact and near-duplicate removal: the first occurrence in input order is kept.

Exact: the sha1 of the normalized text (lowercased, punctuation removed, digits mapped to 0,
whitespace collapsed: CCNet's normalization), rule `duplicate_exact`.

Near: MinHash LSH (Broder 1997; datasketch's MinHash and MinHashLSH). A document's shingles
are its word 5-grams (character 5-grams for CJK text, which has no spaces); its signature is
128 min-hashes. `signature` is pure and runs in the workers; `Deduper` holds the LSH index
and runs on the driver, in input order, so the same documents are kept for any worker count
or executor. An LSH hit is a candidate only: it is confirmed when the signatures' estimated
Jaccard similarity is at least the threshold (default 0.8), rule `duplicate_near`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

NUM_PERM = 128
SHINGLE = 5
SEED = 1
SCHEME = "affine32"  # datasketch's default: (a*h + b) mod the Mersenne prime 2^61-1, 32-bit hashes

_NON_WORD = re.compile(r"[^\w\s]")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DIGIT.sub("0", _NON_WORD.sub("", text))
    return _SPACE.sub(" ", text).strip()


def exact_key(text: str) -> str:
    return hashlib.sha1(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, cjk: bool = False, n: int = SHINGLE) -> set[bytes]:
    norm = normalize(text)
    units = list(norm.replace(" ", "")) if cjk else norm.split()
    if len(units) < n:
        return {(("" if cjk else " ").join(units)).encode("utf-8")}
    sep = "" if cjk else " "
    return {sep.join(units[i: i + n]).encode("utf-8") for i in range(len(units) - n + 1)}


def signature(text: str, cjk: bool = False, num_perm: int = NUM_PERM):
    """The MinHash signature of a document: (num_perm,) uint64 numpy array."""
    from datasketch import MinHash

    try:
        m = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME)  # datasketch >= 2.0 names its hash scheme
    except TypeError:
        m = MinHash(num_perm=num_perm, seed=SEED)  # datasketch 1.x: the same affine32 scheme, unnamed
    m.update_batch(list(shingles(text, cjk)))
    return m.hashvalues


class Deduper:
    """Decides, one document at a time in input order: None (new), or the duplicate rule."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            from hanlin.data.errors import DataPrepError

            raise DataPrepError(f"near-duplicate threshold {threshold} is outside (0, 1]")
        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.exact: dict[str, int] = {}  # exact key -> index of the document kept
        self.sigs: dict[int, object] = {}  # index -> signature, of the documents kept

    def check(self, index: int, key: str, sig) -> tuple[str | None, int | None]:
        """(rule or None, index of the earlier document it duplicates). Keeps `index` if new."""
        import numpy as np
        from datasketch import LeanMinHash

        if key in self.exact:
            return "duplicate_exact", self.exact[key]
        try:
            m = LeanMinHash(seed=SEED, hashvalues=sig, scheme=SCHEME)
        except TypeError:
            m = LeanMinHash(seed=SEED, hashvalues=sig)
        for other in sorted(self.lsh.query(m)):
            if float(np.mean(self.sigs[other] == sig)) >= self.threshold:
                return "duplicate_near", other
        self.exact[key] = index
        self.sigs[index] = sig
        self.lsh.insert(index, m)
        return None, None
