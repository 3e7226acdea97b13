"""k-means over pooled latents, for initialising RVQ codebooks: k-means++ seeding, then Lloyd.

Shapes: N points of dimension D, k centroids.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans(
    x: Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """k-means++ then Lloyd on ``x`` (N, D); returns centroids (k, D) and member counts (k,).

    No two centroids are equal: with fewer distinct points than ``k`` the extra centroids are
    jittered copies of points (they start empty and dead-code replacement recycles them).
    """
    centroids = lloyd(x, _kmeans_plus_plus(x, k, generator), iters)  # (k, D)
    centroids = _separate_duplicates(centroids, _jitter_scale(x), generator)
    _, assign = nearest(x, centroids)
    return centroids, torch.bincount(assign, minlength=k)


def lloyd(x: Tensor, centroids: Tensor, iters: int) -> Tensor:
    """``iters`` Lloyd iterations on ``x`` (N, D) from ``centroids`` (k, D); the new centroids.

    Each centroid moves to the mean of its points; one left with none moves to the point
    farthest from its own centroid (so every code stays in use where the data is).
    """
    centroids = centroids.clone()
    k = len(centroids)
    for _ in range(iters):
        dist, assign = nearest(x, centroids)  # (N,), (N,)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        updated = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        centroids = torch.where((counts > 0).unsqueeze(1), updated, centroids)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(dist.argmax())
            if dist[far] <= 0:  # every point sits on a centroid: keep the jittered one
                break
            centroids[empty] = x[far]
            dist[far] = 0.0
    return centroids


def _jitter_scale(x: Tensor) -> Tensor:
    return x.std().clamp_min(1e-6) * 1e-2


def _separate_duplicates(
    centroids: Tensor, scale: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Jitter all but one of any equal centroids (points repeated in the data can split a
    cluster in two: cdist's matrix-product form is inexact near zero distance)."""
    _, group = torch.unique(centroids, dim=0, return_inverse=True)  # (k,)
    seen: set[int] = set()
    for i, g in enumerate(group.tolist()):
        if g in seen:
            noise = torch.randn(centroids.shape[1], generator=generator, dtype=centroids.dtype)
            centroids[i] = centroids[i] + noise * scale
        seen.add(g)
    return centroids


def nearest(x: Tensor, centroids: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Squared distance to, and index of, each point's nearest centroid; chunked for memory.
    In matrix-product form (|c|^2 - 2 x.c ranks the centroids, |x|^2 added to the best), as
    cdist computes it for sizes like these, without its square root and square."""
    norms = centroids.square().sum(1)  # (k,)
    dists, idx = [], []
    for part in x.split(chunk):
        d = torch.addmm(norms, part, centroids.T, alpha=-2)  # (n, k)
        best = d.min(dim=1)
        dists.append((best.values + part.square().sum(1)).clamp_min_(0))
        idx.append(best.indices)
    return torch.cat(dists), torch.cat(idx)


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding. Each new centroid's distances come from one matrix-vector product
    (|x|^2 - 2 x.c + |c|^2) and the draw from a cumulative sum: the difference form built an
    (N, D) temporary per centroid and took 75% of a 500-file run's 11-minute codebook set-up
    (12 levels x 512 codes over 65536 latents); this is ~10x faster."""
    n = len(x)
    norms = x.square().sum(1)  # (N,)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    d2 = (x - x[first]).square().sum(1)  # (N,)
    scale = _jitter_scale(x)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than codes
            pick = int(torch.randint(n, (1,), generator=generator))
            noise = torch.randn(x.shape[1], generator=generator, dtype=x.dtype) * scale
            centroids.append(x[pick] + noise)
            continue
        pick = _draw(d2, generator)
        centroids.append(x[pick])
        to_pick = (norms - 2 * (x @ x[pick]) + norms[pick]).clamp_min_(0)  # (N,)
        to_pick[pick] = 0.0  # exactly: the product form leaves rounding there
        d2 = torch.minimum(d2, to_pick)
    return torch.stack(centroids)  # (k, D)


def _draw(weights: Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probability proportional to ``weights`` (N,) >= 0, not all zero:
    a uniform draw located in their cumulative sum (float64)."""
    cumulative = weights.to(torch.float64).cumsum(0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, torch.tensor([u], dtype=torch.float64),
                                   right=True))  # fmt: skip
    index = min(index, len(weights) - 1)
    while weights[index] <= 0 and index > 0:  # u on a zero-width step's edge (rounding)
        index -= 1
    return index
