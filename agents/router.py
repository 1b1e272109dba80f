"""The semantic router: which route (specialist, tool, search, direct) a request belongs to, in milliseconds.

Each route is described by exemplar texts. Fitting embeds them once and learns, on the
frozen embeddings:

* a linear head: class-balanced multinomial logistic regression (L-BFGS on whitened
  inputs, so a few dozen steps converge), so a route with 200 exemplars does not swamp
  one with 10;
* a nearest-exemplar vote, softmax-weighted by cosine similarity, which keeps the local
  structure a linear boundary smooths away. Head and vote are blended;
* a temperature for the blend, fitted on out-of-fold predictions (k-fold cross-validation
  over the exemplars for the head; leave-one-out for the nearest-exemplar parts), so
  P(route | in scope) is calibrated;
* an in-scope model, P(in scope), a logistic regression on three features: how near the
  best route's nearest exemplar is *in that route's own spread* (a z-score against how
  near its exemplars are to each other, so a tight route and a loose one are judged
  alike), log P(best route | in scope), and the similarity to the nearest exemplar of any
  route. It learns to tell each held-out exemplar from the same exemplar with its own
  route removed -- a stand-in for a request no route covers, at no extra fit.

Two thresholds come from the out-of-fold predictions:

* out of scope, on P(in scope): set so that `fallback_budget` of the held-out exemplars
  are routed right but fall back, i.e. the in-scope accuracy we accept to lose;
* confident, on confidence = P(in scope) * P(route | in scope): the lowest confidence
  above which out-of-fold routes are right at least `confident_precision` of the time.
  Below it the orchestrator model's tool calling decides, with the candidates as hints.

Routing one request costs one embedding plus one matrix product: exemplar embeddings and
head weights are stacked into one float32 matrix, so the decision is a single mat-vec.

The scoring and fitting math lives in `agents/router_fit.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from agents.router_fit import (
    blend,
    calibrate,
    fit_head,
    out_of_fold,
    route_max,
    route_starts,
    scope_features,
    sigmoid,
    temper,
)
from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atomic_write_bytes, atomic_write_text
from retrieval.embeddings import EmbeddingConfig, Encoder, get_encoder

STATE_FORMAT = 2
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
    fallback_budget: float = Field(0.03, ge=0, lt=1, description="In-scope accuracy the out-of-scope threshold may cost: the share of cross-validated exemplars that were routed right but fall back.")
    confident_precision: float = Field(0.95, gt=0, le=1, description="Routes at or above the confident threshold were right this often in cross-validation; below it the orchestrator model decides.")
    out_of_scope_threshold: float | None = Field(None, ge=0, le=1, description="Fixed threshold on P(in scope) instead of the cross-validated one.")
    confident_threshold: float | None = Field(None, ge=0, le=1, description="Fixed confident threshold instead of the cross-validated one.")
    candidates: int = Field(3, ge=1, description="Ranked candidate routes returned with each decision.")
    seed: int = Field(0, description="Seed of the cross-validation split.")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request goes. `route=None` means out of scope: fall back (orchestrator model or direct)."""

    route: str | None
    confidence: float  # P(in scope) * P(this route | in scope), in [0, 1]
    in_scope: float  # P(in scope): the request falls back when it is below the out-of-scope threshold
    confident: bool  # True: take the route; False: let the orchestrator model's tool calling decide
    candidates: list[tuple[str, float]] = field(default_factory=list)  # best routes first, with confidence
    latency_ms: float = 0.0
    threshold: float = 0.0  # the confident threshold `confidence` was judged against

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
    similarity_mean: np.ndarray  # (routes,) how near a route's exemplars are to their nearest sibling
    similarity_std: np.ndarray  # (routes,)
    scope: np.ndarray  # in-scope model: sigmoid(SCOPE_FEATURES @ scope[:-1] + scope[-1])
    out_of_scope_threshold: float  # on P(in scope)
    confident_threshold: float
    stats: dict[str, Any]
    texts: list[str]
    oof: dict[str, Any] = field(default_factory=dict)  # out-of-fold confidence per route (drift's reference)


class SemanticRouter:
    """Fit on exemplars per route, then `route(text)`; `save`/`load` keep the fitted state on disk."""

    def __init__(self, config: RouterConfig | None = None, encoder: Encoder | None = None):
        self.config = config or RouterConfig()
        self._encoder = encoder
        self._fitted: _Fitted | None = None
        self._matrix: np.ndarray | None = None  # exemplars stacked over weights.T: one mat-vec per decision
        self._starts: np.ndarray | None = None  # where each route's exemplars begin (they are sorted by route)
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
        index = {r: i for i, r in enumerate(routes)}
        y = np.array([index[label] for label in labels])
        order = np.argsort(y, kind="stable")  # each route's exemplars in one contiguous slice
        y, vectors = y[order], np.ascontiguousarray(np.asarray(vectors)[order], dtype=np.float32)
        texts = [texts[i] for i in order] if texts is not None else []
        cfg = self.config
        calibration = calibrate(out_of_fold(vectors, y, len(routes), cfg), len(routes), cfg)
        oos = calibration.out_of_scope_threshold if cfg.out_of_scope_threshold is None else cfg.out_of_scope_threshold
        confident = calibration.confident_threshold if cfg.confident_threshold is None else cfg.confident_threshold
        weights, bias = fit_head(vectors, y, len(routes), cfg.c, cfg.max_iter)
        self._fitted = _Fitted(
            routes=routes, exemplars=vectors, labels=y, weights=weights, bias=bias,
            temperature=calibration.temperature, similarity_mean=calibration.similarity_mean,
            similarity_std=calibration.similarity_std, scope=calibration.scope, out_of_scope_threshold=oos,
            confident_threshold=confident,
            stats={"exemplars": len(y), "routes": len(routes), "fit_s": round(time.perf_counter() - started, 3),
                   **calibration.stats},
            texts=texts, oof=_by_route_name(calibration.oof or {}, routes))
        self._stack()
        return self

    def _stack(self) -> None:
        f = self._require()
        self._matrix = np.ascontiguousarray(np.vstack([f.exemplars, f.weights.T]), dtype=np.float32)
        self._starts = route_starts(f.labels, len(f.routes))

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

    @property
    def oof_confidence(self) -> dict[str, Any]:
        """Out-of-fold confidence when fitted, per route picked ("all": overall): n, quantiles, fallback_share."""
        return dict(self._require().oof)

    def route(self, text: str) -> RouteDecision:
        """Embed `text` and route it; latency_ms covers both."""
        started = time.perf_counter()
        decision = self.route_vector(self.encoder.encode_query(text))
        return _with_latency(decision, started)

    def route_vector(self, vector: np.ndarray) -> RouteDecision:
        """Route an already embedded request (L2-normalised, the encoder's dim)."""
        started = time.perf_counter()
        routed, in_scope = self.route_probabilities(np.asarray(vector, dtype=np.float32)[None, :])
        return _with_latency(self._decide(routed[0] * in_scope[0], float(in_scope[0])), started)

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
        routed = temper(blend(scores[:, n:] + f.bias, similarities, f.labels, len(f.routes), self.config),
                        f.temperature)
        features = scope_features(routed, route_max(similarities, self._starts), f.similarity_mean,
                                  f.similarity_std)
        return routed, sigmoid(features @ f.scope[:-1] + f.scope[-1])

    def fallback(self, in_scope: np.ndarray) -> np.ndarray:
        """Which requests fall back, given their P(in scope) from `route_probabilities`."""
        return np.asarray(in_scope) < self._require().out_of_scope_threshold

    def _decide(self, probs: np.ndarray, in_scope: float) -> RouteDecision:
        f = self._require()
        order = np.argsort(-probs)[: self.config.candidates]
        best = float(probs[order[0]])
        route = f.routes[order[0]] if in_scope >= f.out_of_scope_threshold else None
        return RouteDecision(route=route, confidence=best, in_scope=in_scope,
                             confident=route is not None and best >= f.confident_threshold,
                             candidates=[(f.routes[i], float(probs[i])) for i in order],
                             threshold=f.confident_threshold)

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
                "similarity_mean": f.similarity_mean.tolist(), "similarity_std": f.similarity_std.tolist(),
                "out_of_scope_threshold": f.out_of_scope_threshold,
                "confident_threshold": f.confident_threshold, "config": self.config.model_dump(mode="json"),
                "stats": f.stats, "metadata": self.metadata, "texts": f.texts, "oof_confidence": f.oof}
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
            similarity_mean=np.asarray(meta["similarity_mean"], dtype=np.float64),
            similarity_std=np.asarray(meta["similarity_std"], dtype=np.float64),
            scope=np.asarray(meta["scope"], dtype=np.float64),
            out_of_scope_threshold=float(meta["out_of_scope_threshold"]),
            confident_threshold=float(meta["confident_threshold"]), stats=dict(meta.get("stats", {})),
            texts=list(meta.get("texts", [])), oof=dict(meta.get("oof_confidence", {})))
        router._stack()
        router.metadata = dict(meta.get("metadata", {}))
        return router

    def embeddings_by_text(self) -> dict[str, np.ndarray]:
        """Exemplar text -> its embedding, for reuse by the next fit."""
        f = self._require()
        return dict(zip(f.texts, f.exemplars)) if len(f.texts) == len(f.exemplars) else {}


def _by_route_name(profile: dict[str, Any], routes: list[str]) -> dict[str, Any]:
    return {("all" if key == "all" else routes[int(key)]): value for key, value in profile.items()}


def _with_latency(decision: RouteDecision, started: float) -> RouteDecision:
    return replace(decision, latency_ms=(time.perf_counter() - started) * 1000)
