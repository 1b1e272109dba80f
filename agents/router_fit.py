"""The semantic router's math: scoring (linear head blended with a nearest-exemplar vote) and fitting.

Everything here is a plain function on numpy arrays; `agents/router.py` holds the public API
(RouterConfig, RouteDecision, SemanticRouter) and its module docstring explains the method:
the linear head, the nearest-exemplar vote, temperature scaling, the in-scope model and the
two thresholds, all calibrated on out-of-fold predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("agents.router")  # its warnings are the router's, under the router's logger name


class FitSettings(Protocol):
    """The settings the math reads: `agents.router.RouterConfig` documents each (a Protocol keeps this module
    free of agents.router, which imports it)."""

    neighbors: int
    neighbor_temperature: float
    knn_weight: float
    c: float
    max_iter: int
    cv_folds: int
    fallback_budget: float
    confident_precision: float
    seed: int


# ----------------------------------------------------------------------------- scoring


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _knn_vote(similarities: np.ndarray, labels: np.ndarray, n_routes: int, config: FitSettings) -> np.ndarray:
    """(n, routes) vote of each request's nearest exemplars, weighted by softmax over cosine similarity."""
    n, m = similarities.shape
    k = min(config.neighbors, m)
    top = np.argpartition(-similarities, k - 1, axis=1)[:, :k] if k < m else np.tile(np.arange(m), (n, 1))
    sims = np.take_along_axis(similarities, top, axis=1)
    weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / config.neighbor_temperature)
    cells = (np.arange(n)[:, None] * n_routes + labels[top]).ravel()
    votes = np.bincount(cells, weights=weights.ravel(), minlength=n * n_routes).reshape(n, n_routes)
    return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)


def blend(logits: np.ndarray, similarities: np.ndarray, labels: np.ndarray, n_routes: int,
           config: FitSettings) -> np.ndarray:
    return _mix(_softmax(logits.astype(np.float64)), similarities, labels, n_routes, config)


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of blended probabilities: softmax(log p / T)."""
    return _softmax(np.log(np.maximum(probs, 1e-12)) / temperature)


# ----------------------------------------------------------------------------- fitting


def fit_head(x: np.ndarray, y: np.ndarray, n_routes: int, c: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced multinomial logistic regression, (weights (dim, routes), bias (routes,)).

    L-BFGS runs on whitened inputs (PCA, eigenvalues floored at 1e-3 of the largest) for a
    well-conditioned problem; the penalty is taken in the original space, so the optimum is
    that of plain L2-regularised logistic regression (mean loss + ||W||^2 / (2 C n)).
    """
    import torch

    mean = x.mean(axis=0)
    centered = (x - mean).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / len(x))
    eigenvalues = np.maximum(eigenvalues, max(eigenvalues.max(), 1e-12) * 1e-3)
    whiten = (eigenvectors / np.sqrt(eigenvalues)).astype(np.float32)
    inputs = torch.from_numpy(np.ascontiguousarray((x - mean) @ whiten, dtype=np.float32))
    targets = torch.from_numpy(y.astype(np.int64))
    counts = np.bincount(y, minlength=n_routes).astype(np.float32)
    present = int((counts > 0).sum())
    sample_weight = torch.from_numpy((1.0 / np.maximum(counts, 1))[y] / present)  # each route weighs the same; sums to 1
    l2 = 1.0 / (c * len(x))
    t_whiten = torch.from_numpy(whiten)
    w = torch.zeros(x.shape[1], n_routes, requires_grad=True)
    b = torch.zeros(n_routes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        losses = torch.nn.functional.cross_entropy(inputs @ w + b, targets, reduction="none")
        loss = (losses * sample_weight).sum() + 0.5 * l2 * ((t_whiten @ w) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights = whiten @ w.detach().numpy()  # back to the original space: x @ weights + bias
    bias = b.detach().numpy() - mean @ weights
    return np.ascontiguousarray(weights, dtype=np.float32), bias.astype(np.float32)


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of each exemplar; a route's exemplars spread over folds one by one, so each route keeps one in
    training, and a route with a single exemplar is never held out (-1)."""
    rng = np.random.default_rng(seed)
    folds = np.full(len(y), -1)
    for route in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == route))
        if len(members) >= 2:
            folds[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return folds


def route_starts(labels: np.ndarray, n_routes: int) -> np.ndarray:
    """Where each route's exemplars begin: exemplars are kept sorted by route, one contiguous slice each."""
    return np.searchsorted(labels, np.arange(n_routes))


def route_max(similarities: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(n, routes) similarity of each request to the nearest exemplar of every route."""
    return np.maximum.reduceat(similarities, starts, axis=1)


@dataclass(slots=True)
class OutOfFold:
    """Held-out exemplars scored as requests, twice: as they are, and as if their route did not exist.

    The linear head comes from a fit without the exemplar's fold; the nearest-exemplar parts
    (vote, similarities) leave out only the exemplar itself, as they would for a new request.
    The second view -- own route's head probability and exemplars removed -- stands in for a
    request that no route covers, at no extra fit.
    """

    labels: np.ndarray  # (m,) route of each held-out exemplar
    blend: np.ndarray  # (m, routes) blended, uncalibrated probabilities
    route_max: np.ndarray  # (m, routes) similarity to each route's nearest other exemplar
    blend_unseen: np.ndarray  # the same with the exemplar's own route removed
    route_max_unseen: np.ndarray


def out_of_fold(x: np.ndarray, y: np.ndarray, n_routes: int, config: FitSettings) -> OutOfFold:
    """Out-of-fold predictions for every exemplar whose route has another one; `y` must be sorted."""
    folds = _folds(y, config.cv_folds, config.seed)
    starts = route_starts(y, n_routes)
    parts = []
    for fold in range(config.cv_folds):
        held, train = np.flatnonzero(folds == fold), folds != fold
        if not len(held):
            continue
        rows = np.arange(len(held))
        weights, bias = fit_head(x[train], y[train], n_routes, config.c, config.max_iter)
        head = _softmax((x[held] @ weights + bias).astype(np.float64))
        similarities = x[held] @ x.T
        similarities[rows, held] = -np.inf  # leave the exemplar itself out
        mixed = _mix(head, similarities, y, n_routes, config)
        nearest = route_max(similarities, starts)
        unseen = np.where(y[None, :] == y[held][:, None], -np.inf, similarities)
        head_unseen = head.copy()
        head_unseen[rows, y[held]] = 0
        blend_unseen = _mix(head_unseen / np.maximum(head_unseen.sum(axis=1, keepdims=True), 1e-300), unseen, y,
                            n_routes, config)
        blend_unseen[rows, y[held]] = 0
        route_max_unseen = nearest.copy()
        route_max_unseen[rows, y[held]] = -1.0
        parts.append((held, mixed, nearest, blend_unseen, route_max_unseen))
    if not parts:
        empty = np.zeros((0, n_routes))
        return OutOfFold(np.zeros(0, dtype=int), empty, empty, empty, empty)
    held = np.concatenate([p[0] for p in parts])
    return OutOfFold(y[held], *(np.concatenate([p[i] for p in parts]) for i in range(1, 5)))


def _mix(head: np.ndarray, similarities: np.ndarray, labels: np.ndarray, n_routes: int,
         config: FitSettings) -> np.ndarray:
    """Head probabilities blended with the vote of the nearest exemplars, renormalised."""
    if config.knn_weight == 0:
        return head
    blend = (1 - config.knn_weight) * head + config.knn_weight * _knn_vote(similarities, labels, n_routes, config)
    return blend / blend.sum(axis=1, keepdims=True)


@dataclass(slots=True)
class Calibration:
    temperature: float
    similarity_mean: np.ndarray  # (routes,) typical similarity of a route's exemplar to its nearest sibling
    similarity_std: np.ndarray  # (routes,)
    scope: np.ndarray  # in-scope model: weights of SCOPE_FEATURES, then the bias
    out_of_scope_threshold: float  # on P(in scope)
    confident_threshold: float  # on confidence = P(in scope) * P(route | in scope)
    stats: dict[str, Any]
    oof: dict[str, Any] | None = None  # out-of-fold confidence per route, for drift (`confidence_profile`)


SCOPE_FEATURES = ("nearest_z", "log_route_probability", "nearest_similarity")


def calibrate(oof: OutOfFold, n_routes: int, config: FitSettings) -> Calibration:
    """Temperature, similarity statistics, in-scope model and both thresholds, from out-of-fold predictions.

    The in-scope model is a logistic regression on SCOPE_FEATURES that tells each held-out
    exemplar from the same exemplar with its own route removed. The out-of-scope threshold on
    its probability sends `fallback_budget` of the held-out exemplars that were routed right to
    the fallback: the in-scope accuracy the threshold may cost.
    """
    y = oof.labels
    if len(y) == 0:
        log.warning("no route has two exemplars: the router cannot calibrate, so it never falls back and "
                    "never claims confidence (the orchestrator model decides)")
        always_in_scope = np.append(np.zeros(len(SCOPE_FEATURES)), 10.0)  # zero weights, bias 10: P ~ 1
        return Calibration(1.0, np.zeros(n_routes), np.ones(n_routes), always_in_scope, 0.0, 1.01, {"cv_exemplars": 0})
    temperature, nll = _fit_temperature(oof.blend, y)
    mean, std = similarity_stats(oof.route_max[np.arange(len(y)), y], y, n_routes)
    routed, routed_unseen = temper(oof.blend, temperature), temper(oof.blend_unseen, temperature)
    seen = scope_features(routed, oof.route_max, mean, std)
    unseen = scope_features(routed_unseen, oof.route_max_unseen, mean, std)
    scope = _fit_logistic(np.vstack([seen, unseen]), np.concatenate([np.ones(len(y)), np.zeros(len(y))]))
    in_scope, in_scope_unseen = sigmoid(seen @ scope[:-1] + scope[-1]), sigmoid(unseen @ scope[:-1] + scope[-1])
    correct = routed.argmax(axis=1) == y
    if correct.any():
        share = min(1.0, config.fallback_budget * len(y) / correct.sum())
        oos = float(np.quantile(in_scope[correct], share))
    else:
        oos = 0.0
    confident = _precision_threshold(routed.max(axis=1) * in_scope, correct & (in_scope >= oos),
                                     config.confident_precision)
    fallback = in_scope < oos
    stats = {"cv_exemplars": len(y), "cv_accuracy": round(float(correct.mean()), 4), "cv_nll": round(nll, 4),
             "temperature": round(temperature, 4), "cv_fallback_rate": round(float(fallback.mean()), 4),
             "cv_accuracy_drop": round(float((correct & fallback).mean()), 4),
             "cv_unseen_route_recall": round(float((in_scope_unseen < oos).mean()), 4)}
    confidence = routed.max(axis=1) * in_scope
    oof = confidence_profile(confidence, routed.argmax(axis=1), n_routes, confident, in_scope >= oos)
    return Calibration(temperature, mean, std, scope, oos, confident, stats, oof)


PROFILE_QUANTILES = 21  # 0%, 5%, ..., 100%


def confidence_profile(confidence: np.ndarray, best: np.ndarray, n_routes: int, confident: float,
                       in_scope: np.ndarray) -> dict[str, Any]:
    """How confident the router was on held-out exemplars, per route it picked (by index, as a str) and
    overall ("all"): count, quantiles of the confidence, and the share that would have fallen back (below the
    confident threshold or out of scope). `atelier eval drift` compares live traffic with it."""
    fell_back = (confidence < confident) | ~in_scope

    def summary(mask: np.ndarray) -> dict[str, Any]:
        values = confidence[mask]
        return {"n": int(mask.sum()), "fallback_share": round(float(fell_back[mask].mean()), 4) if mask.any() else None,
                "quantiles": [round(float(q), 4) for q in np.quantile(values, np.linspace(0, 1, PROFILE_QUANTILES))]
                if mask.any() else []}

    return {"all": summary(np.ones(len(confidence), dtype=bool)),
            **{str(r): summary(best == r) for r in range(n_routes)}}


def similarity_stats(nearest: np.ndarray, y: np.ndarray, n_routes: int, prior: float = 5.0,
                      floor: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Per-route mean and spread of an exemplar's similarity to its route's nearest other exemplar.

    Each route's figures are shrunk towards the pooled ones by `prior` pseudo-exemplars, so a
    route with a handful of exemplars gets sane values; the spread never goes below `floor`.
    """
    counts = np.bincount(y, minlength=n_routes).astype(np.float64)
    sums = np.bincount(y, weights=nearest, minlength=n_routes)
    squares = np.bincount(y, weights=nearest ** 2, minlength=n_routes)
    pooled_mean, pooled_var = float(nearest.mean()), float(nearest.var())
    mean = (sums + prior * pooled_mean) / (counts + prior)
    second = (squares + prior * (pooled_var + pooled_mean ** 2)) / (counts + prior)
    return mean, np.sqrt(np.maximum(second - mean ** 2, floor ** 2))


def scope_features(routed: np.ndarray, route_max: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """SCOPE_FEATURES of each request: how near the best route's nearest exemplar is, in that route's own
    spread (z-score); log P(best route | in scope); the similarity to the nearest exemplar of any route."""
    best = routed.argmax(axis=1)
    nearest = route_max[np.arange(len(best)), best]
    return np.stack([(nearest - mean[best]) / std[best], np.log(np.maximum(routed.max(axis=1), 1e-12)),
                     route_max.max(axis=1)], axis=1)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _fit_temperature(blend: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Temperature minimising the NLL of smoothed labels over a log grid.

    The true route gets (n+1)/(n+2) of the target mass (Laplace's rule of succession): with no
    out-of-fold error at all, plain NLL would push the temperature to zero and every answer to 1.0.
    """
    n, routes = blend.shape
    eps = 1.0 / (n + 2)
    target = np.full((n, routes), eps / max(routes - 1, 1))
    target[np.arange(n), y] = 1 - eps
    logp = np.log(np.maximum(blend, 1e-12))
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    losses = [-np.mean((target * _log_softmax(logp / t)).sum(axis=1)) for t in grid]
    best = int(np.argmin(losses))
    return float(grid[best]), float(losses[best])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _fit_logistic(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Logistic regression by Newton's method (L2 as scikit-learn's C=1 on standardised features).

    Returns the weights in the original feature space followed by the bias.
    """
    mean, std = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)
    design = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    theta = np.zeros(design.shape[1])
    ridge = np.append(np.ones(features.shape[1]), 0.0)
    for _ in range(50):
        p = sigmoid(design @ theta)
        gradient = design.T @ (p - targets) + ridge * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(ridge + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = theta[:-1] / std
    return np.append(weights, theta[-1] - weights @ mean)


def _precision_threshold(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float:
    """Lowest confidence t with accuracy >= precision over all predictions at or above t (1.01: never)."""
    order = np.argsort(-confidence)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(running >= precision)
    return float(confidence[order][ok[-1]]) if len(ok) else 1.01
