"""Answer normalisation: how technicians write numbers, units and codes compares equal; nothing else does."""

from __future__ import annotations

import pytest

from eval.answers import contains_answer, exact_match, normalize_answer, token_f1


@pytest.mark.parametrize("written, reference", [
    ("80 N·m", "80 Nm"), ("80 N m", "80 N·m"), ("80 N.m", "80 Nm"), ("80Nm", "80 N·m"), ("80 newton metres", "80 Nm"),
    ("0,05 mm", "0.05 mm"), ("0.05mm", "0.05 mm"), ("4,000 h", "4000 hours"), ("20,000 h", "20000 h"),
    ("0.90 mm", "0.9 mm"), ("290.0 Hz", "290 Hz"), ("85 °C", "85 C"), ("85° C", "85 degrees C"),
    ("0.45-0.55 mm", "0.45 to 0.55 mm"), ("0.45 – 0.55 mm", "0.45 to 0.55 mm"), ("MS-2 45 EPDM", "ms2 45 epdm"),
    ("27.6 A", "27.6 amps"), ("four shims", "4 shims"), ("10 MΩ", "10 MOhm"), ("10 MΩ", "10 megohm"),
    ("3 %", "3%"), ("3 percent", "3%"), ("15 m³/h", "15 m3/h"), ("2 × 7311 BECBM", "2 x 7311 BECBM"),
    ("The Dry-run protection.", "dry run protection"), ("E14", "e14"),
])
def test_what_technicians_write_compares_equal(written, reference):
    assert normalize_answer(written) == normalize_answer(reference)
    assert exact_match(written, reference)


@pytest.mark.parametrize("written, reference", [
    ("8 N·m", "80 N·m"), ("0.5 mm", "0.05 mm"), ("4,000 h", "400 h"), ("80 N·m", "80 mm"), ("E14", "E41"),
    ("0.45 to 0.55 mm", "0.35 to 0.45 mm"), ("27.6 A", "27.6 V"), ("MS-2V", "MS-2"), ("85 °C", "85 K"),
])
def test_different_facts_stay_different(written, reference):
    assert not exact_match(written, reference)


def test_contains_matches_whole_tokens_and_aliases():
    assert contains_answer("Torque it to 80 Nm, then bend the tab washer.", "80 N·m")
    assert not contains_answer("It is 180 N·m.", "80 N·m")
    assert not contains_answer("It is 18 N·m.", "8 N·m")
    assert contains_answer("Wait 20 seconds.", "20 s")
    assert contains_answer("That is the dry running protection", "Dry-run protection", ["dry running"])
    assert not contains_answer("", "80 N·m") and not exact_match("", "80 N·m")


def test_token_f1_is_squad_style_on_normalised_tokens():
    assert token_f1("The Pump, runs!", "pump runs") == 1.0
    assert token_f1("pump runs fast", "pump runs") == pytest.approx(0.8)
    assert token_f1("80 Nm", "80 N·m") == 1.0
    assert token_f1("80", "80 N·m") == pytest.approx(2 / 3)
    assert token_f1("x", "y", ["x"]) == 1.0 and token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
