"""The semantic router: which route (specialist, tool, search, direct) a request belongs to, in milliseconds.

Each route is described by exemplar texts. Fitting embeds them once and learns, on the
frozen embeddings:

* a linear head: class-balanced multinomial logistic regression (L-BFGS on whitened
  inputs, so a few dozen steps converge), so a route with 200 exemplars does not swamp
  one with 10;
* a nearest-exemplar vote, softmax-weighted by cosine similarity, which keeps the local
  structure a linear boundary smooths away. Head and vote are blended;
* a temperature for the blend, fitted on out-of-fold predictions (k-fold cross-validation
  over the exemplars), so P(route | in scope) is calibrated;
* an in-scope model, P(in scope) from (max similarity to any exemplar, route probability),
  a two-feature logistic regression that tells each held-out exemplar from the same
  exemplar with its own route removed: a stand-in for a request no route covers, at no
  extra fit.

`confidence` = P(in scope) * P(route | in scope), with an in-scope prior of one half. Two
thresholds on it come from the out-of-fold predictions:

* out of scope: the `fallback_budget` quantile of the confidence of correctly routed
  exemplars, i.e. the share of good routes we accept to lose to the fallback;
* confident: the lowest confidence above which out-of-fold routes are right at least
  `confident_precision` of the time (never below the out-of-scope one). Between the two
  the orchestrator model's tool calling decides, with the candidates as hints.

Routing one request costs one embedding plus one matrix product: exemplar embeddings and
head weights are stacked into one float32 matrix, so the decision is a single mat-vec.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atomic_write_bytes, atomic_write_text
from retrieval.embeddings import EmbeddingConfig, Encoder, get_encoder

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_ARRAYS, STATE_META = "router.npz", "router.json"


class RouterConfig(StrictModel):
    """How the semantic router scores, calibrates and thresholds routes."""

    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig, description="Sentence-embedding model for exemplars and requests.")
    neighbors: int = Field(10, ge=1, description="Exemplars that vote in the nearest-exemplar scorer.")
    neighbor_temperature: float = Field(0.05, gt=0, description="Softmax temperature over the neighbours' cosine similarities (lower: the nearest counts more).")
    knn_weight: float = Field(0.35, ge=0, le=1, description="Weight of the nearest-exemplar vote in the blend; the linear head gets the rest.")
    c: float = Field(10.0, gt=0, description="Inverse L2 strength of the linear head, as scikit-learn's C (smaller: smoother, less confident).")
    max_iter: int = Field(25, ge=1, description="L-BFGS iterations for the linear head (inputs are whitened, so few are needed).")
    cv_folds: int = Field(5, ge=2, description="Cross-validation folds for calibration and thresholds (a route keeps at least one exemplar in training).")
    fallback_budget: float = Field(0.03, ge=0, lt=1, description="Share of correctly routed in-scope requests the out-of-scope threshold may send to the fallback; the threshold is this quantile of their cross-validated confidence.")
    confident_precision: float = Field(0.95, gt=0, le=1, description="Routes at or above the confident threshold were right this often in cross-validation; below it the orchestrator model decides.")
    out_of_scope_threshold: float | None = Field(None, ge=0, le=1, description="Fixed out-of-scope threshold instead of the cross-validated one.")
    confident_threshold: float | None = Field(None, ge=0, le=1, description="Fixed confident threshold instead of the cross-validated one.")
    candidates: int = Field(3, ge=1, description="Ranked candidate routes returned with each decision.")
    seed: int = Field(0, description="Seed of the cross-validation split.")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request goes. `route=None` means out of scope: fall back (orchestrator model or direct)."""

    route: str | None
    confidence: float  # P(in scope) * P(this route | in scope), in [0, 1]
    confident: bool  # True: take the route; False: let the orchestrator model's tool calling decide
    candidates: list[tuple[str, float]] = field(default_factory=list)  # best routes first, with confidence
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Fitted:
    routes: list[str]
    exemplars: np.ndarray  # (n, dim) float32, L2-normalised
    labels: np.ndarray  # (n,) route index of each exemplar
    weights: np.ndarray  # (dim, routes) linear head
    bias: np.ndarray  # (routes,)
    temperature: float
    scope: np.ndarray  # (3,) in-scope model: sigmoid(a * max similarity + b * log route probability + c)
    out_of_scope_threshold: float
    confident_threshold: float
    stats: dict[str, Any]
    texts: list[str]


class SemanticRouter:
    """Fit on exemplars per route, then `route(text)`; `save`/`load` keep the fitted state on disk."""

    def __init__(self, config: RouterConfig | None = None, encoder: Encoder | None = None):
        self.config = config or RouterConfig()
        self._encoder = encoder
        self._fitted: _Fitted | None = None
        self._matrix: np.ndarray | None = None  # exemplars stacked over weights.T: one mat-vec per decision
        self.metadata: dict[str, Any] = {}  # what `save` was given (RouterCache keeps its fingerprint there)

    # -- fitting ----------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = get_encoder(self.config.embedding)
        return self._encoder

    def fit(self, exemplars: dict[str, list[str]], known: dict[str, np.ndarray] | None = None) -> SemanticRouter:
        """Fit on {route: exemplar texts}. `known` maps texts to embeddings already computed (reused, not re-embedded)."""
        texts, labels = [], []
        for route, items in exemplars.items():
            for text in dict.fromkeys(t.strip() for t in items if t and t.strip()):
                texts.append(text)
                labels.append(route)
        known = known or {}
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        fresh = dict(zip(missing, self.encoder.encode(missing))) if missing else {}
        vectors = np.stack([known[t] if t in known else fresh[t] for t in texts]) if texts else np.zeros((0, 1))
        return self.fit_vectors(vectors, labels, texts=texts)

    def fit_vectors(self, vectors: np.ndarray, labels: list[str], texts: list[str] | None = None) -> SemanticRouter:
        """Fit on precomputed L2-normalised exemplar embeddings and their route labels."""
        routes = sorted(set(labels))
        if len(routes) < 2:
            raise AtelierError(f"the router needs exemplars for at least two routes, got {routes or 'none'}; "
                               "register a specialist, add a tool or index documents")
        started = time.perf_counter()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = {r: i for i, r in enumerate(routes)}
        y = np.array([index[label] for label in labels])
        cfg = self.config
        oof = _out_of_fold(vectors, y, len(routes), cfg)
        temperature, scope, oos, confident, cv_stats = _calibrate(oof, cfg)
        oos = oos if cfg.out_of_scope_threshold is None else cfg.out_of_scope_threshold
        confident = max(confident, oos) if cfg.confident_threshold is None else cfg.confident_threshold
        weights, bias = _fit_head(vectors, y, len(routes), cfg.c, cfg.max_iter)
        self._fitted = _Fitted(
            routes=routes, exemplars=vectors, labels=y, weights=weights, bias=bias, temperature=temperature,
            scope=scope, out_of_scope_threshold=oos, confident_threshold=confident,
            stats={"exemplars": len(y), "routes": len(routes), "fit_s": round(time.perf_counter() - started, 3),
                   **cv_stats},
            texts=list(texts) if texts is not None else [])
        self._stack()
        return self

    def _stack(self) -> None:
        f = self._require()
        self._matrix = np.ascontiguousarray(np.vstack([f.exemplars, f.weights.T]), dtype=np.float32)

    def _require(self) -> _Fitted:
        if self._fitted is None:
            raise AtelierError("the router is not fitted; call fit() or load() first")
        return self._fitted

    # -- routing ----------------------------------------------------------------------
    @property
    def routes(self) -> list[str]:
        return list(self._require().routes)

    @property
    def out_of_scope_threshold(self) -> float:
        return self._require().out_of_scope_threshold

    @property
    def confident_threshold(self) -> float:
        return self._require().confident_threshold

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._require().stats)

    def route(self, text: str) -> RouteDecision:
        """Embed `text` and route it; latency_ms covers both."""
        started = time.perf_counter()
        decision = self.route_vector(self.encoder.encode_query(text))
        return _with_latency(decision, started)

    def route_vector(self, vector: np.ndarray) -> RouteDecision:
        """Route an already embedded request (L2-normalised, the encoder's dim)."""
        started = time.perf_counter()
        probs = self.probabilities(np.asarray(vector, dtype=np.float32)[None, :])[0]
        return _with_latency(self._decide(probs), started)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Confidence of every route, (n, routes), for n embedded requests (columns follow `routes`).

        A row sums to the request's in-scope probability; the rest is the out-of-scope mass.
        """
        routed, in_scope = self.route_probabilities(vectors)
        return routed * in_scope[:, None]

    def route_probabilities(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two factors of the confidence: P(route | in scope), (n, routes), and P(in scope), (n,)."""
        f = self._require()
        scores = np.asarray(vectors, dtype=np.float32) @ self._matrix.T
        n = len(f.labels)
        similarities = scores[:, :n]
        routed = _temper(_blend(scores[:, n:] + f.bias, similarities, f.labels, len(f.routes), self.config),
                         f.temperature)
        return routed, _in_scope(f.scope, similarities.max(axis=1), routed.max(axis=1))

    def _decide(self, probs: np.ndarray) -> RouteDecision:
        f = self._require()
        order = np.argsort(-probs)[: self.config.candidates]
        best = float(probs[order[0]])
        route = f.routes[order[0]] if best >= f.out_of_scope_threshold else None
        return RouteDecision(route=route, confidence=best,
                             confident=route is not None and best >= f.confident_threshold,
                             candidates=[(f.routes[i], float(probs[i])) for i in order])

    # -- persistence ------------------------------------------------------------------
    def save(self, folder: Path, metadata: dict[str, Any] | None = None) -> None:
        """Write router.npz, then router.json (holding the npz's SHA-256 and `metadata`), each atomically."""
        f = self._require()
        if metadata is not None:
            self.metadata = dict(metadata)
        buffer = io.BytesIO()
        np.savez(buffer, exemplars=f.exemplars, labels=f.labels, weights=f.weights, bias=f.bias)
        data = buffer.getvalue()
        folder = Path(folder)
        atomic_write_bytes(folder / STATE_ARRAYS, data)
        meta = {"format": STATE_FORMAT, "arrays_sha256": hashlib.sha256(data).hexdigest(), "routes": f.routes,
                "temperature": f.temperature, "scope": f.scope.tolist(),
                "out_of_scope_threshold": f.out_of_scope_threshold,
                "confident_threshold": f.confident_threshold, "config": self.config.model_dump(mode="json"),
                "stats": f.stats, "metadata": self.metadata, "texts": f.texts}
        atomic_write_text(folder / STATE_META, json.dumps(meta) + "\n")

    @classmethod
    def load(cls, folder: Path, encoder: Encoder | None = None) -> SemanticRouter:
        """A fitted router from `save`'s folder; an AtelierError if it is missing, stale or damaged."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / STATE_META).read_text(encoding="utf-8"))
            data = (folder / STATE_ARRAYS).read_bytes()
        except (OSError, ValueError) as exc:
            raise AtelierError(f"no usable router state in {folder} ({exc}); fit the router again") from None
        if meta.get("format") != STATE_FORMAT or meta.get("arrays_sha256") != hashlib.sha256(data).hexdigest():
            raise AtelierError(f"the router state in {folder} is from another version or half-written; "
                               "delete the folder and fit the router again")
        arrays = np.load(io.BytesIO(data))
        router = cls(RouterConfig.model_validate(meta["config"]), encoder)
        router._fitted = _Fitted(
            routes=list(meta["routes"]), exemplars=arrays["exemplars"], labels=arrays["labels"],
            weights=arrays["weights"], bias=arrays["bias"], temperature=float(meta["temperature"]),
            scope=np.asarray(meta["scope"], dtype=np.float64),
            out_of_scope_threshold=float(meta["out_of_scope_threshold"]),
            confident_threshold=float(meta["confident_threshold"]), stats=dict(meta.get("stats", {})),
            texts=list(meta.get("texts", [])))
        router._stack()
        router.metadata = dict(meta.get("metadata", {}))
        return router

    def embeddings_by_text(self) -> dict[str, np.ndarray]:
        """Exemplar text -> its embedding, for reuse by the next fit."""
        f = self._require()
        return dict(zip(f.texts, f.exemplars)) if len(f.texts) == len(f.exemplars) else {}


def _with_latency(decision: RouteDecision, started: float) -> RouteDecision:
    return replace(decision, latency_ms=(time.perf_counter() - started) * 1000)


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
