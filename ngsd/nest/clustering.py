"""k-means (k-means++ start, several seeded restarts) and the silhouette score, in torch; k by silhouette."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Clustering:
    """Cluster per point, the centres, and the silhouette of every k tried."""

    labels: torch.Tensor
    centers: torch.Tensor
    k: int
    silhouettes: dict[int, float]


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 4, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, centres) of the restart with the lowest inertia; deterministic for a seed."""
    if x.dim() != 2:
        raise ValueError(f"x must be [points, features], got shape {tuple(x.shape)}")
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}] (the number of points), got {k}")
    x = x.double()
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(restarts):
        centers = _plus_plus(x, k, generator)
        labels = torch.cdist(x, centers).argmin(1)
        for _ in range(iterations):
            for c in range(k):
                members = x[labels == c]
                # An empty cluster takes the point farthest from its centre.
                centers[c] = members.mean(0) if len(members) else x[torch.cdist(x, centers).min(1).values.argmax()]
            new = torch.cdist(x, centers).argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels.clone(), centers.clone())
    assert best is not None
    return best[1], best[2].float()


def _plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    centers = [x[int(torch.randint(len(x), (1,), generator=generator))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        total = float(d2.sum())
        index = int(torch.multinomial(d2 / total, 1, generator=generator)) if total > 0 else int(torch.randint(len(x), (1,), generator=generator))
        centers.append(x[index])
    return torch.stack(centers).clone()


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (Euclidean): (b - a) / max(a, b) per point, 0 for points alone in their cluster."""
    ks = labels.unique()
    if len(ks) < 2:
        raise ValueError("the silhouette needs at least two clusters")
    d = torch.cdist(x.double(), x.double())
    onehot = (labels[:, None] == ks[None, :]).double()  # [n, K]
    sizes = onehot.sum(0)
    sums = d @ onehot  # distance sums from each point to each cluster
    own = (labels[:, None] == ks[None, :])
    own_size = (sizes[None, :] * own).sum(1)
    a = (sums * own).sum(1) / (own_size - 1).clamp_min(1)
    other = torch.where(own, torch.full_like(sums, float("inf")), sums / sizes[None, :])
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own_size > 1, s, torch.zeros_like(s))
    return float(s.mean())


def cluster_by_silhouette(x: torch.Tensor, *, k_min: int = 2, k_max: int = 12, seed: int = 0, restarts: int = 4) -> Clustering:
    """k-means for every k in [k_min, min(k_max, n - 1)]; keep the k with the highest silhouette (ties: smaller k)."""
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"need 2 <= k_min <= k_max, got {k_min}, {k_max}")
    if len(x) < 3:
        raise ValueError(f"clustering by silhouette needs at least 3 points, got {len(x)}")
    if k_min > len(x) - 1:  # no k to try (the silhouette needs a point more than clusters)
        raise ValueError(f"k_min = {k_min} clusters need at least {k_min + 1} points, got {len(x)}; lower k_min "
                         "(--k-min)")
    best: tuple[float, int, torch.Tensor, torch.Tensor] | None = None
    scores: dict[int, float] = {}
    for k in range(k_min, min(k_max, len(x) - 1) + 1):
        labels, centers = kmeans(x, k, seed=seed, restarts=restarts)
        if len(labels.unique()) < 2:
            continue
        scores[k] = silhouette(x, labels)
        if best is None or scores[k] > best[0] + 1e-9:
            best = (scores[k], k, labels, centers)
    if best is None:
        raise ValueError("k-means found fewer than two distinct clusters for every k; the profiles are identical")
    return Clustering(best[2], best[3], best[1], scores)


def cluster_within_groups(x: torch.Tensor, groups: torch.Tensor, *, k_min: int = 2, k_max: int = 12, seed: int = 0,
                          restarts: int = 4) -> tuple[torch.Tensor, dict[int, Clustering | None]]:
    """`cluster_by_silhouette` separately within each group (e.g. each decoder layer); cluster ids are
    numbered across groups. A group of fewer than 4 points, or of no more than k_min, is one cluster (None in
    the result)."""
    if len(groups) != len(x):
        raise ValueError(f"groups must give one group per point: {len(groups)} groups for {len(x)} points")
    labels = torch.empty(len(x), dtype=torch.long)
    by_group: dict[int, Clustering | None] = {}
    next_id = 0
    for group in groups.unique().tolist():
        where = (groups == group).nonzero(as_tuple=True)[0]
        splits = len(where) >= 4 and len(where) > k_min
        result = cluster_by_silhouette(x[where], k_min=k_min, k_max=k_max, seed=seed, restarts=restarts) if splits else None
        local = result.labels.unique(return_inverse=True)[1] if result is not None else torch.zeros(len(where), dtype=torch.long)
        labels[where] = local + next_id
        next_id += int(local.max()) + 1
        by_group[int(group)] = result
    return labels, by_group
