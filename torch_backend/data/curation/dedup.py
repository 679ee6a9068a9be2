"""Near-duplicate clips by perceptual hash: 64-bit DCT pHash of key frames, Hamming distance.

pHash (Zauner 2010, the "pHash" library's DCT hash): the grey frame shrunk to 32x32 (area
average, so re-encoding noise and small shifts vanish), its 2-D DCT, the 8x8 lowest frequencies
without the DC term's influence (the median is taken over the 64 coefficients excluding DC), one
bit per coefficient above the median. Brightness changes move the DC term only; a re-encode or a
1-2 px shift flips a few bits; different content about half.

A clip's signature is the hashes of `key_frames` frames spread over it; two clips are near
duplicates when the mean distance of each key frame to its nearest key frame in the other clip
(both ways) is at most `max_distance`, and their colour layouts agree (`chroma_layout`; pHash
alone is blind to colour). Groups are the connected components of that relation (union-find), so a chain of
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


def chroma_layout(rgb: np.ndarray) -> str:
    """Colour layout of an RGB frame: the mean Cr and Cb (YCrCb, uint8) of an 8x8 grid, as hex.

    pHash is grey and contrast-normalised: a cyan and a pink cube of one silhouette on similar
    backgrounds hash alike (measured 3.4-4.6 bits apart on the generated sources). Chroma tells
    them apart and barely moves under a brightness change (x1.06 moves it by ~1-4 levels).
    """
    ycc = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YCrCb)
    grid = cv2.resize(ycc, (8, 8), interpolation=cv2.INTER_AREA)[..., 1:]
    return grid.astype(np.uint8).tobytes().hex()


def chroma_distance(a: list[str], b: list[str]) -> float:
    """Symmetric mean nearest-frame distance of chroma layouts: per frame pair the largest
    per-cell |difference| (a product is a few cells of the grid; a mean would dilute it)."""
    if not a or not b:
        return 255.0
    fa = [np.frombuffer(bytes.fromhex(x), np.uint8).astype(np.int16) for x in a]
    fb = [np.frombuffer(bytes.fromhex(x), np.uint8).astype(np.int16) for x in b]
    d = np.array([[np.abs(x - y).max() for y in fb] for x in fa], dtype=np.float64)
    return float((d.min(axis=1).mean() + d.min(axis=0).mean()) / 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def signature_distance(a: list[int], b: list[int]) -> float:
    """Symmetric mean nearest-frame Hamming distance of two key-frame hash lists (64 = all bits
    differ): each key frame of one clip is matched to the nearest key frame of the other.

    Not frame-by-frame: the same shot cut by different transitions (a cut in one source, a
    dissolve eating 8 frames in another) starts at different frames, so its i-th key frames show
    different moments (measured on the generated sources: 4-32 bits frame-by-frame, 4-14 nearest).
    """
    if not a or not b:
        return 64.0
    d = np.array([[hamming(x, y) for y in b] for x in a], dtype=np.float64)
    return float((d.min(axis=1).mean() + d.min(axis=0).mean()) / 2)


def band_edges(bands: int) -> list[tuple[int, int]]:
    """(low bit, width) of each band: 64 bits split as evenly as possible."""
    widths = [64 // bands + (i < 64 % bands) for i in range(bands)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def candidate_pairs(signatures: dict[str, list[int]], bands: int) -> set[tuple[str, str]]:
    """(a, b), a < b, of clips with some key frame of a and some key frame of b equal on a band.

    Completeness: if two clips' signature distance is <= D, some key-frame pair of theirs is
    within D bits (the symmetric mean of nearest distances is at least the smallest one), and
    D < bands flipped bits leave at least one band equal (pigeonhole), so the pair is here."""
    buckets: dict[tuple[int, int], set[str]] = {}
    edges = band_edges(bands)
    for key, hashes in signatures.items():
        for h in hashes:
            for i, (lo, width) in enumerate(edges):
                buckets.setdefault((i, (h >> lo) & ((1 << width) - 1)), set()).add(key)
    pairs = set()
    for members in buckets.values():
        ordered = sorted(members)
        pairs.update((a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:])
    return pairs


def band_miss_probability(distance: int, bands: int) -> float:
    """Probability that two hashes `distance` bits apart, the bits uniformly placed, share no
    band (every band has a flipped bit): inclusion-exclusion over the bands left untouched.
    0 for distance < bands. A clip pair is missed only if every key-frame pair is missed."""
    from itertools import combinations
    from math import comb
    widths = [w for _, w in band_edges(bands)]
    missed = 0   # integer counts: exact, so "never" comes out as 0, not a rounding residue
    for j in range(bands + 1):
        for clean in combinations(range(bands), j):   # these bands untouched
            missed += (-1) ** j * comb(64 - sum(widths[i] for i in clean), distance)
    return missed / comb(64, distance)


def group(signatures: dict[str, list[int]], max_distance: float,
          chroma: dict[str, list[str]] | None = None, max_chroma: float = 255.0,
          bands: int = 0) -> dict[str, str]:
    """Key -> group id (the smallest key of its group) for every key in a group of >= 2.
    Near duplicates: pHash distance <= max_distance and (when `chroma` is given) chroma layout
    distance <= max_chroma.

    bands = 0 compares all pairs: O(n^2) popcounts, a few seconds for 10^4 clips. bands = k
    compares only `candidate_pairs` (LSH banding): the same groups whenever k > max_distance, and
    at 10^6 clips (too many pairs) 4 bands of 16 bits with the miss rate of
    `band_miss_probability` for key-frame pairs 4-8 bits apart (docs/curation.md).
    """
    keys = sorted(signatures)
    if bands:
        pairs = sorted(candidate_pairs(signatures, bands))
    else:
        pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in pairs:
        if signature_distance(signatures[a], signatures[b]) <= max_distance and (
                chroma is None or chroma_distance(chroma[a], chroma[b]) <= max_chroma):
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
