"""Fusing the BM25 and dense rankings into one.

Two methods, both over the candidates each leg returned:

* `rrf`: reciprocal rank fusion, sum of w / (k + rank). Robust to score scales, but it
  throws the scores away and can fall below its better leg (Bruch et al., 2022, found it
  sensitive to k; published BEIR runs show it losing to the better leg on some sets).
* `convex`: a weighted sum of per-leg scores after normalisation,
  alpha * dense + (1 - alpha) * bm25. BM25 is scaled by the best score of the query
  (its theoretical minimum is 0); cosine similarity is mapped from [min, max] of the
  candidates. Missing candidates count as the leg's minimum. Bruch et al. found a tuned
  convex combination beat RRF in and out of domain; `docs/retrieval.md` records the
  measurement that chose the default here.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from pydantic import Field

from atelier.config import StrictModel

Ranking = Sequence[tuple[str, float]]  # (key, score), best first


class FusionMethod(str, Enum):
    convex = "convex"
    rrf = "rrf"


class FusionConfig(StrictModel):
    method: FusionMethod = Field(FusionMethod.convex, description="How hybrid search fuses its two legs: convex (weighted normalised scores) or rrf.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Convex fusion: weight of the dense leg; the BM25 leg gets 1 - alpha.")
    rrf_k: int = Field(60, ge=1, description="RRF rank constant k in 1 / (k + rank).")
    candidates: int = Field(100, ge=1, description="How many candidates each leg contributes before fusion.")


def rrf(legs: dict[str, Ranking], k: int = 60, weights: dict[str, float] | None = None) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(d) = sum over legs of w_leg / (k + rank_leg(d)), rank from 1."""
    fused: dict[str, float] = {}
    for leg, ranking in legs.items():
        weight = 1.0 if weights is None else weights.get(leg, 1.0)
        for rank, (key, _score) in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def _normalise_bm25(ranking: Ranking) -> dict[str, float]:
    top = max((score for _, score in ranking), default=0.0)
    if top <= 0:
        return {key: 0.0 for key, _ in ranking}
    return {key: score / top for key, score in ranking}


def _normalise_minmax(ranking: Ranking) -> dict[str, float]:
    if not ranking:
        return {}
    scores = [score for _, score in ranking]
    low, high = min(scores), max(scores)
    if high - low <= 1e-12:
        return {key: 1.0 for key, _ in ranking}
    return {key: (score - low) / (high - low) for key, score in ranking}


def convex(bm25: Ranking, dense: Ranking, alpha: float = 0.5) -> list[tuple[str, float]]:
    """alpha * normalised dense + (1 - alpha) * normalised BM25; a missing candidate scores 0 in that leg."""
    lexical = _normalise_bm25(bm25)
    semantic = _normalise_minmax(dense)
    keys = lexical.keys() | semantic.keys()
    fused = {key: alpha * semantic.get(key, 0.0) + (1.0 - alpha) * lexical.get(key, 0.0) for key in keys}
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def fuse(bm25: Ranking, dense: Ranking, config: FusionConfig) -> list[tuple[str, float]]:
    """Fuse the two legs with the configured method."""
    if config.method is FusionMethod.rrf:
        return rrf({"bm25": bm25, "dense": dense}, k=config.rrf_k)
    return convex(bm25, dense, alpha=config.alpha)
