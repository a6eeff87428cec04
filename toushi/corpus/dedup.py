"""Duplicate removal: exact (normalised text), near (MinHash LSH on character 3-grams), optional embeddings.

Character n-grams need no tokenizer, so the same code works for zh and en. The first occurrence of a
group is kept (callers order posts so that the preferred copy comes first).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

NUM_PERM = 128
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Case, width, punctuation and spacing folded away: what 'the same text' means for dedup."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def exact_duplicates(texts: Sequence[str]) -> list[int]:
    """Indices of texts whose normalised form appeared earlier."""
    seen: set[str] = set()
    dups = []
    for i, t in enumerate(texts):
        key = normalise(t)
        if key in seen:
            dups.append(i)
        seen.add(key)
    return dups


def shingles(text: str, n: int = 3) -> set[bytes]:
    s = normalise(text)
    if len(s) <= n:
        return {s.encode("utf-8")}
    return {s[i : i + n].encode("utf-8") for i in range(len(s) - n + 1)}


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, seed: int = 1) -> list[int]:
    """Indices of texts whose char-3-gram Jaccard (MinHash estimate) with an earlier kept text >= threshold."""
    if not texts:
        return []
    shingle_sets = [list(shingles(t)) for t in texts]
    minhashes = MinHash.bulk(shingle_sets, num_perm=NUM_PERM, seed=seed)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    dups = []
    for i, mh in enumerate(minhashes):
        # LSH gives candidates; the estimated Jaccard confirms them (LSH alone lets some pairs below through).
        if any(minhashes[j].jaccard(mh) >= threshold for j in lsh.query(mh)):
            dups.append(i)
            continue
        lsh.insert(i, mh)
    return dups


def embedding_duplicates(texts: Sequence[str], threshold: float, embedder=None, batch_size: int = 64) -> list[int]:
    """Indices of texts whose MiniLM embedding has cosine >= threshold with an earlier kept text."""
    if not texts:
        return []
    from toushi.metrics import load_embedder

    emb = (embedder or load_embedder()).encode(list(texts), batch_size=batch_size)
    kept: list[int] = []
    dups = []
    for i in range(len(texts)):
        if kept and float(np.max(emb[kept] @ emb[i])) >= threshold:
            dups.append(i)
        else:
            kept.append(i)
    return dups
