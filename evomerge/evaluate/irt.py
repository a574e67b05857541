"""Item response theory for cheap fitness: a 2PL fit, anchor items, and full-set score estimates.

Pure torch, no I/O. One task at a time: a response matrix `Y` (subjects x items, 1 = correct) is
modelled as P(Y_ij = 1) = sigmoid(a_j * (theta_i - b_j)), with discrimination a_j > 0, difficulty
b_j and ability theta_i. Each task gets its own abilities (fit per task, not jointly): in a merge
search the parents each know a different skill, so one ability across tasks would misfit them all.

The fit is a MAP estimate (small Gaussian priors on theta, log a and b keep items that every
calibration model got right, or wrong, at finite values), full-batch L-BFGS from a deterministic
start. Anchors are chosen as in tinyBenchmarks (Maia Polo et al., 2024): k-means over the items'
embeddings, one representative item per cluster, weighted by its cluster's size. The three
estimators of a task's full-set accuracy from a candidate's anchor responses follow the same paper:
the weighted anchor mean, p-IRT (fit the candidate's ability on its anchors, predict the unseen
items) and gp-IRT (a convex mix of the two, lambda chosen from their errors on the calibration set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

THETA_PRIOR = 1.0  # sd of the ability prior
LOG_A_PRIOR = 0.5  # sd of log discrimination: a stays within ~e^{+-1} unless the data insist
B_PRIOR = 2.0  # sd of the difficulty prior


@dataclass(frozen=True)
class ItemFit:
    """A fitted 2PL on one task: per item `a`, `b` (items,), per calibration subject `theta` (subjects,)."""

    a: torch.Tensor
    b: torch.Tensor
    theta: torch.Tensor

    def prob(self, theta: torch.Tensor) -> torch.Tensor:
        """P(correct) of abilities `theta` (m,) on every item: (m, items)."""
        return torch.sigmoid(self.a * (theta[:, None] - self.b))


@dataclass(frozen=True)
class Anchors:
    """Representative items: `index` into the task's items, `weight` = items each stands for (sums to the count)."""

    index: torch.Tensor  # (k,) long
    weight: torch.Tensor  # (k,) float


def _as_responses(responses: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(responses, dtype=torch.float64)
    if y.ndim != 2 or y.numel() == 0:
        raise ValueError(f"responses must be a non-empty subjects x items matrix, got shape {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("responses must be 0 or 1 (a binary per-item metric such as acc)")
    return y


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(0.05, 0.95)
    return torch.log(p / (1 - p))


def fit_2pl(responses: torch.Tensor, *, max_iter: int = 500) -> ItemFit:
    """MAP fit of a 2PL on `responses` (subjects x items, 0/1). Deterministic: same data, same fit."""
    y = _as_responses(responses)
    # Start: abilities from each subject's accuracy, difficulties from each item's.
    theta = _logit(y.mean(1)).clone().requires_grad_(True)
    b = (-_logit(y.mean(0))).clone().requires_grad_(True)
    log_a = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [theta, b, log_a], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = log_a.exp() * (theta[:, None] - b)
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        prior = (
            0.5 * (theta / THETA_PRIOR).square().sum()
            + 0.5 * (log_a / LOG_A_PRIOR).square().sum()
            + 0.5 * (b / B_PRIOR).square().sum()
        )
        value = nll + prior
        value.backward()
        return value

    optimizer.step(loss)
    return ItemFit(a=log_a.detach().exp(), b=b.detach(), theta=theta.detach())


def fit_ability(fit: ItemFit, index: torch.Tensor, responses: torch.Tensor, *, steps: int = 50) -> torch.Tensor:
    """MAP abilities (m,) of m candidates from their responses (m, k) on the items `index` (item params fixed).

    Newton's method on a strictly concave 1-D objective per candidate (the prior makes it so).
    """
    y = torch.as_tensor(responses, dtype=torch.float64).reshape(-1, len(index))
    a, b = fit.a[index], fit.b[index]
    theta = torch.zeros(y.shape[0], dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(a * (theta[:, None] - b))
        grad = (a * (y - p)).sum(1) - theta / THETA_PRIOR**2
        hess = -(a.square() * p * (1 - p)).sum(1) - 1 / THETA_PRIOR**2
        step = grad / hess
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    return theta


def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Cluster labels (n,) of k-means++ then Lloyd; fewer clusters than k when points repeat."""
    n = points.shape[0]
    centres = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        d2 = torch.cdist(points, points[centres]).square().min(1).values
        if float(d2.sum()) <= 0:
            break  # every point coincides with a centre already
        centres.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
    centroids = points[centres].clone()
    labels = torch.cdist(points, centroids).argmin(1)
    for _ in range(iters):
        for c in range(centroids.shape[0]):
            members = labels == c
            if members.any():
                centroids[c] = points[members].mean(0)
        new_labels = torch.cdist(points, centroids).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def choose_anchors(embedding: torch.Tensor, k: int, *, seed: int) -> Anchors:
    """At most `k` anchor items of the rows of `embedding` (items x features), weights = cluster sizes.

    Features are standardised first; each cluster's anchor is its member nearest the centroid.
    With k >= the item count every item is its own anchor (weight 1), so the estimators are exact.
    """
    points = torch.as_tensor(embedding, dtype=torch.float64)
    n = points.shape[0]
    if k < 1:
        raise ValueError(f"anchors must be >= 1, got {k}")
    if k >= n:
        return Anchors(index=torch.arange(n), weight=torch.ones(n, dtype=torch.float64))
    spread = points.std(0)
    points = (points - points.mean(0)) / torch.where(spread > 0, spread, torch.ones_like(spread))
    generator = torch.Generator().manual_seed(seed)
    labels = _kmeans(points, k, generator)
    index, weight = [], []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        centroid = points[members].mean(0)
        index.append(int(members[(points[members] - centroid).norm(dim=1).argmin()]))
        weight.append(float(len(members)))
    order = torch.tensor(index).argsort()
    return Anchors(index=torch.tensor(index)[order], weight=torch.tensor(weight, dtype=torch.float64)[order])


def item_embedding(fit: ItemFit, responses: torch.Tensor, cluster_on: str) -> torch.Tensor:
    """What anchors cluster on: the IRT parameters (a, b) per item, or each item's response column."""
    if cluster_on == "irt":
        return torch.stack([fit.a, fit.b], dim=1)
    if cluster_on == "responses":
        return _as_responses(responses).T.clone()
    raise ValueError(f"cluster_on must be 'irt' or 'responses', got {cluster_on!r}")


def anchor_estimate(anchors: Anchors, anchor_responses: torch.Tensor) -> torch.Tensor:
    """The weighted mean of anchor correctness (m,) of candidates' responses (m, k)."""
    y = torch.as_tensor(anchor_responses, dtype=torch.float64).reshape(-1, len(anchors.index))
    return (y * anchors.weight).sum(1) / anchors.weight.sum()


def p_irt_estimate(fit: ItemFit, anchors: Anchors, anchor_responses: torch.Tensor) -> torch.Tensor:
    """p-IRT (m,): seen anchors count as answered, every other item as its predicted P(correct)."""
    y = torch.as_tensor(anchor_responses, dtype=torch.float64).reshape(-1, len(anchors.index))
    n = fit.a.shape[0]
    theta = fit_ability(fit, anchors.index, y)
    probs = fit.prob(theta)
    unseen = torch.ones(n, dtype=torch.bool)
    unseen[anchors.index] = False
    return (y.sum(1) + probs[:, unseen].sum(1)) / n


def gp_irt_estimate(fit: ItemFit, anchors: Anchors, anchor_responses: torch.Tensor, lam: float) -> torch.Tensor:
    """gp-IRT (m,): lam * anchor estimate + (1 - lam) * p-IRT."""
    return lam * anchor_estimate(anchors, anchor_responses) + (1 - lam) * p_irt_estimate(fit, anchors, anchor_responses)


def choose_lambda(fit: ItemFit, responses: torch.Tensor, *, anchors: int, cluster_on: str, seed: int) -> float:
    """gp-IRT's mixing weight from the calibration subjects: lam = e_p / (e_p + e_a), where e_a and e_p
    are the anchor estimate's and p-IRT's mean squared errors against the subjects' full scores
    (tinyBenchmarks' heuristic: trust the anchors more where p-IRT is off by more than their noise).

    Each subject is estimated from anchors chosen without its own responses (leave one out; the
    item parameters are kept): anchors clustered on responses that include the subject would
    reproduce its score exactly and push lam to 1. With every item an anchor both are exact: lam 1.
    """
    y = _as_responses(responses)
    full = y.mean(1)
    e_anchor = e_pirt = 0.0
    for i in range(y.shape[0]):
        others = torch.cat([y[:i], y[i + 1 :]])
        chosen = choose_anchors(item_embedding(fit, others, cluster_on), anchors, seed=seed)
        seen = y[i : i + 1, chosen.index]
        e_anchor += float((anchor_estimate(chosen, seen) - full[i]).square().sum())
        e_pirt += float((p_irt_estimate(fit, chosen, seen) - full[i]).square().sum())
    if e_anchor + e_pirt <= 1e-12:
        return 1.0
    return e_pirt / (e_anchor + e_pirt)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    return _pearson(_ranks(torch.as_tensor(x, dtype=torch.float64)), _ranks(torch.as_tensor(y, dtype=torch.float64)))


def kendall(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kendall's tau-b (ties on either side counted as in scipy); NaN when either side is constant."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    dx = torch.sign(x[:, None] - x[None, :]).triu(1)
    dy = torch.sign(y[:, None] - y[None, :]).triu(1)
    concordance = float((dx * dy).sum())
    nx, ny = float((dx != 0).sum()), float((dy != 0).sum())
    if nx == 0 or ny == 0:
        return math.nan
    return concordance / math.sqrt(nx * ny)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():  # ties share their average rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan
