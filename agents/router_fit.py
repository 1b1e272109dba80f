"""The semantic router's math: scoring (linear head blended with a nearest-exemplar vote) and fitting.

Everything here is a plain function on numpy arrays; `agents/router.py` holds the public API
(RouterConfig, RouteDecision, SemanticRouter) and its module docstring explains the method:
the linear head, the nearest-exemplar vote, temperature scaling, the in-scope model and the
two thresholds, all calibrated on out-of-fold predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from agents.router import RouterConfig

log = logging.getLogger("agents.router")  # its warnings are the router's, under the router's logger name


# ----------------------------------------------------------------------------- scoring


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _knn_vote(similarities: np.ndarray, labels: np.ndarray, n_routes: int, config: RouterConfig) -> np.ndarray:
    """(n, routes) vote of each request's nearest exemplars, weighted by softmax over cosine similarity."""
    n, m = similarities.shape
    k = min(config.neighbors, m)
    top = np.argpartition(-similarities, k - 1, axis=1)[:, :k] if k < m else np.tile(np.arange(m), (n, 1))
    sims = np.take_along_axis(similarities, top, axis=1)
    weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / config.neighbor_temperature)
    cells = (np.arange(n)[:, None] * n_routes + labels[top]).ravel()
    votes = np.bincount(cells, weights=weights.ravel(), minlength=n * n_routes).reshape(n, n_routes)
    return votes / votes.sum(axis=1, keepdims=True)


def _blend(logits: np.ndarray, similarities: np.ndarray, labels: np.ndarray, n_routes: int,
           config: RouterConfig) -> np.ndarray:
    head = _softmax(logits.astype(np.float64))
    if config.knn_weight == 0:
        return head
    return (1 - config.knn_weight) * head + config.knn_weight * _knn_vote(similarities, labels, n_routes, config)


def _temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of blended probabilities: softmax(log p / T)."""
    return _softmax(np.log(np.maximum(probs, 1e-12)) / temperature)


# ----------------------------------------------------------------------------- fitting


def _fit_head(x: np.ndarray, y: np.ndarray, n_routes: int, c: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(slots=True)
class _OutOfFold:
    """Held-out exemplars scored by models fitted without their fold."""

    labels: np.ndarray  # (m,) route of each held-out exemplar
    blend: np.ndarray  # (m, routes) blended, uncalibrated probabilities
    max_similarity: np.ndarray  # (m,) to the fold's training exemplars
    max_similarity_other: np.ndarray  # (m,) to those of other routes: the exemplar as if its route did not exist


def _out_of_fold(x: np.ndarray, y: np.ndarray, n_routes: int, config: RouterConfig) -> _OutOfFold:
    folds = _folds(y, config.cv_folds, config.seed)
    parts = []
    for fold in range(config.cv_folds):
        held, train = np.flatnonzero(folds == fold), folds != fold
        if not len(held):
            continue
        weights, bias = _fit_head(x[train], y[train], n_routes, config.c, config.max_iter)
        similarities = x[held] @ x[train].T
        blend = _blend(x[held] @ weights + bias, similarities, y[train], n_routes, config)
        other = np.where(y[train][None, :] == y[held][:, None], -np.inf, similarities).max(axis=1)
        parts.append((held, blend, similarities.max(axis=1), other))
    if not parts:
        empty = np.zeros(0)
        return _OutOfFold(empty.astype(int), np.zeros((0, n_routes)), empty, empty)
    held = np.concatenate([p[0] for p in parts])
    return _OutOfFold(y[held], *(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)))


def _calibrate(oof: _OutOfFold, config: RouterConfig) -> tuple[float, np.ndarray, float, float, dict[str, Any]]:
    """Temperature, in-scope model, out-of-scope and confident thresholds, all from out-of-fold predictions.

    The in-scope model is a logistic regression on (max similarity, log route probability) that
    tells each held-out exemplar from the same exemplar with its own route removed, a stand-in
    for a request no route covers, which costs no extra fit.
    """
    y = oof.labels
    if len(y) == 0:
        log.warning("no route has two exemplars: the router cannot calibrate, so it never falls back and "
                    "never claims confidence (the orchestrator model decides)")
        return 1.0, np.array([0.0, 0.0, 10.0]), 0.0, 1.01, {"cv_exemplars": 0}
    temperature, nll = _fit_temperature(oof.blend, y)
    routed = _temper(oof.blend, temperature)
    masked = oof.blend.copy()
    masked[np.arange(len(y)), y] = 0
    masked = _temper(masked / np.maximum(masked.sum(axis=1, keepdims=True), 1e-12), temperature)
    scope = _fit_scope(np.concatenate([oof.max_similarity, oof.max_similarity_other]),
                       np.concatenate([routed.max(axis=1), masked.max(axis=1)]),
                       np.concatenate([np.ones(len(y)), np.zeros(len(y))]))
    confidence = routed.max(axis=1) * _in_scope(scope, oof.max_similarity, routed.max(axis=1))
    correct = routed.argmax(axis=1) == y
    oos = float(np.quantile(confidence[correct], config.fallback_budget)) if correct.any() else 0.0
    confident = _precision_threshold(confidence, correct, config.confident_precision)
    pseudo = masked.max(axis=1) * _in_scope(scope, oof.max_similarity_other, masked.max(axis=1))
    stats = {"cv_exemplars": len(y), "cv_accuracy": round(float(correct.mean()), 4), "cv_nll": round(nll, 4),
             "temperature": round(temperature, 4), "cv_fallback_rate": round(float((confidence < oos).mean()), 4),
             "cv_unseen_route_recall": round(float((pseudo < oos).mean()), 4)}
    return temperature, scope, oos, confident, stats


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


def _scope_features(max_similarity: np.ndarray, route_probability: np.ndarray) -> np.ndarray:
    return np.stack([max_similarity, np.log(np.maximum(route_probability, 1e-12))], axis=1)


def _in_scope(scope: np.ndarray, max_similarity: np.ndarray, route_probability: np.ndarray) -> np.ndarray:
    z = _scope_features(max_similarity, route_probability) @ scope[:2] + scope[2]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _fit_scope(max_similarity: np.ndarray, route_probability: np.ndarray, in_scope: np.ndarray) -> np.ndarray:
    """Two-feature logistic regression by Newton's method (L2 as scikit-learn's C=1), returns (a, b, c)."""
    features = _scope_features(max_similarity, route_probability)
    mean, std = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)
    design = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    theta, ridge = np.zeros(3), np.array([1.0, 1.0, 0.0])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ theta, -50, 50)))
        gradient = design.T @ (p - in_scope) + ridge * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(ridge + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = theta[:2] / std
    return np.array([weights[0], weights[1], theta[2] - weights @ mean])


def _precision_threshold(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float:
    """Lowest confidence t with accuracy >= precision over all predictions at or above t (1.01: never)."""
    order = np.argsort(-confidence)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(running >= precision)
    return float(confidence[order][ok[-1]]) if len(ok) else 1.01
