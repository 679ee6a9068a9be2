"""Near-duplicate clips by perceptual hash: 64-bit DCT pHash of key frames, Hamming distance.

pHash (Zauner 2010, the "pHash" library's DCT hash): the grey frame shrunk to 32x32 (area
average, so re-encoding noise and small shifts vanish), its 2-D DCT, the 8x8 lowest frequencies
without the DC term's influence (the median is taken over the 64 coefficients excluding DC), one
bit per coefficient above the median. Brightness changes move the DC term only; a re-encode or a
1-2 px shift flips a few bits; different content about half.

A clip's signature is the hashes of `key_frames` frames spread over it; two clips are near
duplicates when the mean Hamming distance of their corresponding key frames is at most
`max_distance`. Groups are the connected components of that relation (union-find), so a chain of
near copies forms one group; each group keeps one clip (the sharpest, then the longest, then the
first by key) and records the rest with the group id.
"""
from __future__ import annotations

import cv2
import numpy as np


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB uint8 frame."""
    g = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def signature_distance(a: list[int], b: list[int]) -> float:
    """Mean Hamming distance of corresponding key-frame hashes (64 = all bits differ)."""
    n = min(len(a), len(b))
    return float(np.mean([hamming(x, y) for x, y in zip(a[:n], b[:n])])) if n else 64.0


def group(signatures: dict[str, list[int]], max_distance: float) -> dict[str, str]:
    """Key -> group id (the smallest key of its group) for every key in a group of >= 2.

    All pairs are compared: O(n^2) popcounts, a few seconds for 10^4 clips. A cluster run of
    10^6 clips needs banding (LSH over hash bits) first; docs/curation.md says so.
    """
    keys = sorted(signatures)
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if signature_distance(signatures[a], signatures[b]) <= max_distance:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = {k: find(k) for k in keys}
    sizes: dict[str, int] = {}
    for r in roots.values():
        sizes[r] = sizes.get(r, 0) + 1
    return {k: r for k, r in roots.items() if sizes[r] > 1}


def keep_one(groups: dict[str, str], rank: dict[str, tuple]) -> set[str]:
    """Keys to drop: in each group all but the best by `rank` (higher tuple = better)."""
    members: dict[str, list[str]] = {}
    for k, g in groups.items():
        members.setdefault(g, []).append(k)
    drop = set()
    for ks in members.values():
        best = max(sorted(ks), key=lambda k: rank[k])   # sorted: ties go to the first key
        drop.update(k for k in ks if k != best)
    return drop
