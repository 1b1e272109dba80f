"""The semantic router on a small routing set, with the real MiniLM encoder."""

import json

import numpy as np
import pytest

from agents.router import RouteDecision, RouterConfig, SemanticRouter
from atelier.errors import AtelierError

ROUTES = {
    "weather": ["what's the weather tomorrow", "will it rain in Paris this afternoon", "forecast for the weekend",
                "is it going to snow tonight", "how hot will it be today", "do I need an umbrella"],
    "billing": ["why was I charged twice", "I need a refund for my last invoice", "update the credit card on my account",
                "my payment failed", "cancel my subscription", "where can I download my receipt"],
    "pumps": ["the pump is leaking at the mechanical seal", "how do I prime a centrifugal pump",
              "impeller replacement procedure", "the pump makes a cavitation noise",
              "the pump motor bearing is overheating", "check the shaft alignment of the pump"],
    "recipes": ["how long do I boil an egg", "a recipe for pancakes", "how to make tomato sauce",
                "vegetarian lasagne recipe", "what can I cook with chicken and rice", "how to bake bread at home"],
}
IN_SCOPE = {
    "is it going to be sunny on Saturday": "weather",
    "I was billed two times this month": "billing",
    "water is dripping from the pump seal": "pumps",
    "how do I make a chocolate cake": "recipes",
    "my card payment did not go through": "billing",
    "the impeller is worn, how do I swap it": "pumps",
}
OUT_OF_SCOPE = ["who won the football world cup in 1998", "explain quantum entanglement",
                "what is the best programming language for beginners", "recommend a novel about space travel"]


@pytest.fixture(scope="module")
def router(encoder):
    return SemanticRouter(RouterConfig(), encoder).fit(ROUTES)


def test_clear_queries_take_their_route_confidently(router):
    for text, label in IN_SCOPE.items():
        decision = router.route(text)
        assert decision.route == label, (text, decision)
        assert decision.confident and decision.confidence >= router.confident_threshold
        assert decision.in_scope >= router.out_of_scope_threshold
        assert decision.candidates[0] == (label, decision.confidence)
        assert decision.latency_ms > 0


def test_out_of_scope_queries_fall_back(router):
    for text in OUT_OF_SCOPE:
        decision = router.route(text)
        assert decision.route is None, (text, decision)
        assert not decision.confident
        assert decision.in_scope < router.out_of_scope_threshold
        assert len(decision.candidates) == 3  # still ranked, as hints for the orchestrator model


def test_confidence_is_higher_for_clear_queries(router):
    clear = [router.route(text).confidence for text in IN_SCOPE]
    ambiguous = router.route("the weather made my pump bill go up")  # three routes in one sentence
    vague = [router.route(text).confidence for text in OUT_OF_SCOPE]
    assert min(clear) > ambiguous.confidence > max(vague)
    assert 0.0 <= min(vague) and max(clear) <= 1.0
    probs = router.probabilities(np.stack([router.encoder.encode_query(t) for t in IN_SCOPE]))
    assert np.all(probs.sum(axis=1) <= 1.0 + 1e-6)  # the rest is the out-of-scope mass
    stats = router.stats
    assert stats["cv_exemplars"] == 24 and stats["cv_accuracy"] > 0.9
    assert 0 < router.out_of_scope_threshold < 1 and 0 < router.confident_threshold < 1
    assert stats["cv_accuracy_drop"] <= RouterConfig().fallback_budget + 1 / 24  # one exemplar of slack


def test_route_vector_matches_route(router):
    text = "forecast for Monday morning"
    by_text, by_vector = router.route(text), router.route_vector(router.encoder.encode_query(text))
    assert (by_text.route, by_text.candidates) == (by_vector.route, by_vector.candidates)
    assert isinstance(by_text, RouteDecision) and by_text.to_dict()["route"] == "weather"


def test_save_load_round_trip_gives_identical_decisions(router, encoder, tmp_path):
    router.save(tmp_path / "state", {"fingerprint": "abc"})
    loaded = SemanticRouter.load(tmp_path / "state", encoder)
    assert loaded.routes == router.routes and loaded.metadata == {"fingerprint": "abc"}
    for text in [*IN_SCOPE, *OUT_OF_SCOPE]:
        vector = encoder.encode_query(text)
        a, b = router.route_vector(vector), loaded.route_vector(vector)
        assert (a.route, a.confidence, a.confident, a.candidates) == (b.route, b.confidence, b.confident, b.candidates)
    assert loaded.embeddings_by_text().keys() == router.embeddings_by_text().keys()


def test_damaged_state_is_refused(router, encoder, tmp_path):
    router.save(tmp_path / "state")
    (tmp_path / "state" / "router.npz").write_bytes(b"not an npz")
    with pytest.raises(AtelierError, match="half-written"):
        SemanticRouter.load(tmp_path / "state", encoder)
    with pytest.raises(AtelierError, match="no usable router state"):
        SemanticRouter.load(tmp_path / "missing", encoder)
    meta = json.loads((tmp_path / "state" / "router.json").read_text())
    assert meta["config"]["knn_weight"] == RouterConfig().knn_weight


def test_refit_reuses_known_embeddings(router, encoder):
    class CountingEncoder:
        def __init__(self):
            self.calls = []

        def encode(self, texts):
            self.calls.append(list(texts))
            return encoder.encode(texts)

    counting = CountingEncoder()
    routes = {**ROUTES, "music": ["play some jazz", "turn the volume up", "next song please"]}
    SemanticRouter(RouterConfig(), counting).fit(routes, known=router.embeddings_by_text())
    assert counting.calls == [routes["music"]]  # only the new route's exemplars were embedded


def test_needs_two_routes_and_a_fit(encoder):
    with pytest.raises(AtelierError, match="at least two routes"):
        SemanticRouter(RouterConfig(), encoder).fit({"weather": ROUTES["weather"]})
    with pytest.raises(AtelierError, match="not fitted"):
        SemanticRouter(RouterConfig(), encoder).route("hello")


def test_fixed_thresholds_override_the_cross_validated_ones(encoder, router):
    fixed = SemanticRouter(RouterConfig(out_of_scope_threshold=0.0, confident_threshold=0.99), encoder)
    fixed.fit(ROUTES, known=router.embeddings_by_text())
    decision = fixed.route(OUT_OF_SCOPE[0])
    assert decision.route is not None and not decision.confident  # nothing falls back at threshold 0


def test_similarity_stats_shrink_small_routes_to_the_pooled_figures():
    from agents.router_fit import similarity_stats

    nearest = np.array([0.9, 0.91, 0.89, 0.9, 0.92, 0.88, 0.5])  # route 0: six tight exemplars; route 1: one loose
    mean, std = similarity_stats(nearest, np.array([0, 0, 0, 0, 0, 0, 1]), 2)
    pooled = nearest.mean()
    assert pooled < mean[0] < 0.9  # six exemplars pull route 0 most of the way to its own figure
    assert 0.5 < mean[1] < pooled and mean[1] - 0.5 > pooled - mean[1]  # one barely moves route 1 off the pool
    assert np.all(std >= 0.02) and std[1] > std[0]


def test_the_fallback_budget_sets_what_the_threshold_may_cost(encoder, router):
    known = router.embeddings_by_text()
    strict = SemanticRouter(RouterConfig(fallback_budget=0.0), encoder).fit(ROUTES, known=known)
    loose = SemanticRouter(RouterConfig(fallback_budget=0.3), encoder).fit(ROUTES, known=known)
    assert strict.stats["cv_accuracy_drop"] == 0.0
    assert 0.2 <= loose.stats["cv_accuracy_drop"] <= 0.3 + 1 / 24
    assert strict.out_of_scope_threshold < router.out_of_scope_threshold < loose.out_of_scope_threshold
    assert loose.stats["cv_unseen_route_recall"] >= strict.stats["cv_unseen_route_recall"]
