"""Leakage audit at ingest: near-duplicate images on two sides of the split.

Groups keep what the dataset says belongs together in one split; nothing checks
that images it does not group are unrelated. Two views of one patient, a copy
re-exported under another name, neighbouring slices of one scan: the model is then
scored on what it trained on. Ingest hashes every image and reports the pairs
across splits that look alike, so the card can say what the split guarantees.

The hash is a 64-bit DCT perceptual hash (pHash): the image in grey, resized to
32x32, the 8x8 lowest frequencies of its 2-D DCT, one bit per coefficient above
the mean of the 63 non-constant ones. (The usual median threshold is unstable on
near-symmetric anatomy: half the coefficients are then about zero, the median
lands among them and noise flips a quarter of the bits.) Two images are
near-duplicates when their hashes differ in at most ``max_distance`` bits, either
as they are or with one mirrored left-right (a flipped copy is the same anatomy).
A volume is hashed by its central axial plane.

Finding the pairs without comparing all of them: split the 64 bits into
``max_distance + 1`` bands; two hashes within ``max_distance`` bits agree exactly
on at least one band (pigeonhole). Per band, hashes are sorted by the band's
value, each hash meets only those with the same value, and every candidate is
verified on all 64 bits. Candidates are made and checked in blocks of at most
``block`` pairs (or one bucket's row), so memory stays bounded; time is near-linear
unless many images share a band value, which is itself a sign of duplicates.
A pair met in several bands is counted once, in the first test that meets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn

from synthmed.data.sample import Sample
from synthmed.core.errors import PipelineError

BITS = 64
MAX_DISTANCE = 10  # more bands than 11 leave too few bits per band to prune, and unrelated images start to match
_SIDE, _LOW = 32, 8
_MIRROR_SIGN = np.where(np.arange(_LOW) % 2, -1.0, 1.0)  # DCT-II of a left-right flip: odd columns change sign
_WEIGHTS = 1 << np.arange(BITS - 1, -1, -1, dtype=np.uint64)


def check_max_distance(bits: int, name: str = "ingest.near_duplicate_bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= MAX_DISTANCE:
        raise PipelineError(f"params.yaml: {name} must be an integer from 0 to {MAX_DISTANCE} (bits of {BITS} that "
                            f"two near-duplicate images may differ in), got {bits!r}; 4 is a good default")


def plane(sample: Sample) -> np.ndarray:
    """The 2-D image a sample is hashed by: the image, or a volume's central axial plane (RAS: z is axis 2),
    transposed so that columns run left-right as in the 2-D images."""
    a = sample.array()
    if sample.file_name.endswith(".npy"):
        return a[:, :, a.shape[2] // 2].T
    return a


def phash(image: np.ndarray) -> tuple[int, int]:
    """(hash, hash of the left-right mirror image) of a uint8 (H, W) or (H, W, 3) image, as 64-bit integers."""
    im = Image.fromarray(np.ascontiguousarray(image))
    grey = np.asarray(im.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, type=2, norm="ortho")[:_LOW, :_LOW]
    return _bits(low), _bits(low * _MIRROR_SIGN)


def _bits(coefficients: np.ndarray) -> int:
    flat = coefficients.ravel()
    return int(((flat > flat[1:].mean()).astype(np.uint64) * _WEIGHTS).sum())


def hashes(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """uint64 pHashes of every sample and of its mirror image, one sample in memory at a time."""
    h, m = np.zeros(len(samples), np.uint64), np.zeros(len(samples), np.uint64)
    for i, s in enumerate(samples):
        h[i], m[i] = phash(plane(s))
    return h, m


@dataclass(frozen=True)
class NearDuplicate:
    a: int  # sample indices, a < b
    b: int
    distance: int  # differing bits of 64
    mirrored: bool  # closest with one image mirrored left-right


@dataclass
class Audit:
    pairs: int  # near-duplicate pairs whose images lie in different splits
    listed: list[NearDuplicate]  # each image's closest such partner, each pair once: at most one row per image
    max_distance: int


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int64)


def _bands(max_distance: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) of each of max_distance + 1 bands covering the 64 bits."""
    n = max_distance + 1
    widths = [BITS // n + (1 if k < BITS % n else 0) for k in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, np.uint64((1 << w) - 1)))
        shift += w
    return out


def _key(h: np.ndarray, band: tuple[int, np.uint64]) -> np.ndarray:
    return (h >> np.uint64(band[0])) & band[1]


def _collisions(queries: np.ndarray, targets: np.ndarray, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query index, target index) of every pair with equal keys, in blocks of about ``block`` pairs."""
    order = np.argsort(targets, kind="stable")
    ranked = targets[order]
    lo = np.searchsorted(ranked, queries, "left")
    counts = np.searchsorted(ranked, queries, "right") - lo
    hit = np.flatnonzero(counts)
    total = np.cumsum(counts[hit])
    start = 0
    while start < len(hit):
        done = int(total[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(total, done + block, "right")))
        q = hit[start:end]
        c = counts[q]
        first = np.cumsum(c) - c
        offsets = np.arange(int(c.sum())) - np.repeat(first, c)
        yield np.repeat(q, c), order[np.repeat(lo[q], c) + offsets]
        start = end


def near_duplicates(h: np.ndarray, m: np.ndarray, splits: Sequence[str], max_distance: int,
                    block: int = 1 << 20) -> Audit:
    """Near-duplicate pairs (hashes ``h``, mirror hashes ``m``) whose members lie in different ``splits``."""
    n = len(h)
    codes = np.unique(np.asarray(splits, dtype=object), return_inverse=True)[1] if n else np.zeros(0, int)
    bands = _bands(max_distance)
    hk = [_key(h, b) for b in bands]
    mk = [_key(m, b) for b in bands]
    best_d = np.full(n, BITS + 1, np.int64)
    best_p = np.full(n, -1, np.int64)
    mirrored = np.zeros(n, bool)
    pairs = 0
    # Tests in a fixed order: hash~hash in band 0..k, then per band mirror(i)~hash(j) (X), mirror(j)~hash(i) (Y)
    for kind in ("plain", "mirror"):
        for b in range(len(bands)):
            for q, t in _collisions(hk[b] if kind == "plain" else mk[b], hk[b], block):
                keep = (q < t) if kind == "plain" else (q != t)
                q, t = q[keep], t[keep]
                keep = codes[q] != codes[t]
                q, t = q[keep], t[keep]
                i, j = np.minimum(q, t), np.maximum(q, t)
                plain = popcount(h[i] ^ h[j])
                d = np.minimum(plain, np.minimum(popcount(m[i] ^ h[j]), popcount(h[i] ^ m[j])))
                owned = d <= max_distance
                if kind == "plain":
                    for e in range(b):  # met by an earlier band
                        owned &= hk[e][i] != hk[e][j]
                else:
                    for e in range(len(bands)):  # met by any plain band
                        owned &= hk[e][i] != hk[e][j]
                    for e in range(b):  # met by an earlier mirror band, either way round
                        owned &= (mk[e][i] != hk[e][j]) & (mk[e][j] != hk[e][i])
                    owned &= ~((q > t) & (mk[b][i] == hk[b][j]))  # Y after X in this band
                i, j, d, plain = i[owned], j[owned], d[owned], plain[owned]
                pairs += len(i)
                _closest(best_d, best_p, mirrored, np.concatenate([i, j]), np.concatenate([j, i]),
                         np.concatenate([d, d]), np.concatenate([plain > d, plain > d]))
    found = np.flatnonzero(best_p >= 0)
    listed = sorted({NearDuplicate(int(min(a, best_p[a])), int(max(a, best_p[a])), int(best_d[a]), bool(mirrored[a]))
                     for a in found}, key=lambda x: (x.a, x.b))
    return Audit(pairs, listed, max_distance)


def _closest(best_d: np.ndarray, best_p: np.ndarray, mirrored: np.ndarray, node: np.ndarray, partner: np.ndarray,
             d: np.ndarray, flipped: np.ndarray) -> None:
    """Keep each node's closest partner (ties: the lowest index), so the listing does not depend on the order."""
    if not len(node):
        return
    order = np.lexsort((partner, d, node))
    node, partner, d, flipped = node[order], partner[order], d[order], flipped[order]
    first = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    node, partner, d, flipped = node[first], partner[first], d[first], flipped[first]
    better = (d < best_d[node]) | ((d == best_d[node]) & (partner < best_p[node]))
    node, partner, d, flipped = node[better], partner[better], d[better], flipped[better]
    best_d[node], best_p[node], mirrored[node] = d, partner, flipped


def audit(samples: Sequence[Sample], max_distance: int) -> Audit:
    """Near-duplicates across the splits of ``samples`` (splits assigned)."""
    check_max_distance(max_distance)
    h, m = hashes(samples)
    return near_duplicates(h, m, [s.split for s in samples], max_distance)


def describe(pair: NearDuplicate, samples: Sequence[Sample]) -> str:
    """One line naming the two output files (never a source path), their splits and distance."""
    a, b = samples[pair.a], samples[pair.b]
    how = ", one mirrored" if pair.mirrored else ""
    return (f"{a.file_name} ({a.split}) and {b.file_name} ({b.split}) look alike (perceptual hash {pair.distance} "
            f"of {BITS} bits apart{how}); if they show one patient or scan, give them one group: near-duplicates "
            "across splits inflate held-out scores")


def stop_without_groups(found: Audit, samples: Sequence[Sample], *, alone: str, fix: str) -> None:
    """A dataset without groups whose splits share near-duplicates may have cut patients: one line, unless none."""
    if not found.pairs:
        return
    first = found.listed[0]
    a, b = samples[first.a], samples[first.b]
    raise PipelineError(
        f"ingest: {found.pairs} near-duplicate image pair(s) across splits (e.g. {a.file_name} in {a.split} and "
        f"{b.file_name} in {b.split}) and no groups, {alone} is its own, so images of one patient may sit on both "
        f"sides; {fix}, or set ingest.image_level_splits: true to accept image-level splits"
    )
