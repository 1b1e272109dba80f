import pytest

from retrieval.fusion import FusionConfig, FusionMethod, convex, fuse, rrf


def test_rrf_matches_the_formula():
    fused = dict(rrf({"bm25": [("a", 9.0), ("b", 5.0)], "dense": [("b", 0.9), ("c", 0.8)]}, k=60))
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["c"] == pytest.approx(1 / 62)


def test_rrf_k_changes_the_order():
    # small k rewards one leg's top hit, large k rewards agreement between legs
    legs = {"bm25": [("a", 1), ("x", 1), ("b", 1)], "dense": [("y", 1), ("z", 1), ("w", 1), ("b", 1)]}
    assert [key for key, _ in rrf(legs, k=1)][0] == "a"
    assert [key for key, _ in rrf(legs, k=100)][0] == "b"


def test_convex_weights_and_normalises():
    bm25 = [("a", 10.0), ("b", 5.0)]
    dense = [("b", 0.9), ("c", 0.5), ("a", 0.1)]
    fused = dict(convex(bm25, dense, alpha=0.5))
    assert fused["a"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
    assert fused["b"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert fused["c"] == pytest.approx(0.5 * 0.5)
    assert [k for k, _ in convex(bm25, dense, alpha=0.0)][0] == "a"
    assert [k for k, _ in convex(bm25, dense, alpha=1.0)][0] == "b"


def test_fuse_dispatches_on_method_and_handles_empty_legs():
    assert fuse([], [], FusionConfig()) == []
    assert [k for k, _ in fuse([("a", 1.0)], [], FusionConfig(method=FusionMethod.rrf))] == ["a"]
    assert [k for k, _ in fuse([], [("z", 0.3)], FusionConfig())] == ["z"]
