"""Scoring a short answer against a reference: normalised exact match, "contains", token F1.

SQuAD's normalisation (lower case, no punctuation, no articles) with what technicians write
added: numbers and their units compare equal however they are spelled (`80 N·m`, `80 Nm`,
`80 N m`; `0.05 mm`, `0,05 mm`; `4,000 h`, `4000 hours`; `0.90 mm`, `0.9 mm`; `85 °C`, `85 C`),
ranges (`0.45-0.55 mm`, `0.45 to 0.55 mm`), codes with or without their hyphen (`MS-2`, `MS2`),
`×`/`x`, and the small number words (`four shims`, `4 shims`). Pure Python, no imports.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_CHARS = {"·": " ", "⋅": " ", "×": " x ", "−": "-", "–": "-", "—": "-", "‑": "-", "Ω": "ohm", "ω": "ohm",
          "µ": "u", "μ": "u", "°": " deg", "º": " deg", "%": " pct ", "³": "3", "²": "2", "’": "'"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])}
# unit spellings after a number -> one canonical token; pairs first ("n m" -> "nm")
_UNIT_PAIRS = {("n", "m"): "nm", ("deg", "c"): "degc", ("degree", "c"): "degc", ("degrees", "c"): "degc",
               ("newton", "metre"): "nm", ("newton", "metres"): "nm", ("newton", "meter"): "nm",
               ("newton", "meters"): "nm", ("m", "ohm"): "mohm", ("v", "dc"): "vdc"}
_UNITS = {"nm": "nm", "degc": "degc", "c": "degc", "deg": "degc", "degree": "degc", "degrees": "degc",
          "h": "h", "hr": "h", "hrs": "h", "hour": "h", "hours": "h",
          "s": "s", "sec": "s", "secs": "s", "second": "s", "seconds": "s",
          "min": "min", "mins": "min", "minute": "min", "minutes": "min",
          "l": "l", "litre": "l", "litres": "l", "liter": "l", "liters": "l",
          "a": "amp", "amp": "amp", "amps": "amp", "ampere": "amp", "amperes": "amp",
          "mohm": "mohm", "megohm": "mohm", "megohms": "mohm", "vdc": "vdc",
          "pct": "pct", "percent": "pct", "um": "um", "micron": "um", "microns": "um",
          "millimetre": "mm", "millimetres": "mm", "millimeter": "mm", "millimeters": "mm"}
_ARTICLES = {"a", "an", "the"}
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


def _canonical_number(token: str) -> str:
    """4000 and 04000 alike, 0.90 as 0.9, 290.0 as 290."""
    whole, _, frac = token.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def answer_tokens(text: str) -> list[str]:
    """The normalised tokens of an answer (see the module docstring for what compares equal)."""
    text = unicodedata.normalize("NFKC", str(text))
    text = "".join(_CHARS.get(ch, ch) for ch in text).lower()
    text = re.sub(r"(?<![\d.,])(\d{1,3})((?:,\d{3})+)(?![\d,])", lambda m: m.group(1) + m.group(2).replace(",", ""),
                  text)  # 4,000 h and 20,000 h: thousands separators
    text = re.sub(r"(?<=\d),(?=\d)", ".", text)  # 0,05 mm: a decimal comma
    text = re.sub(r"(?<![\w.-])(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)(?![\w.-])", r"\1 to \2", text)  # ranges
    text = re.sub(r"(?<=[a-z0-9])-(?=\d)|(?<=\d)-(?=[a-z0-9])", "", text)  # codes: MS-2 = MS2, 40-502-B
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)  # keep decimal points through the punctuation pass
    text = "".join(" " if (unicodedata.category(ch).startswith(("P", "S")) and ch != "\x00") else ch for ch in text)
    text = text.replace("\x00", ".")
    raw = [_NUMBER_WORDS.get(t, t) for t in text.split()]
    # a number glued to its unit ("80nm", "0.05mm", "85c"): split it
    split: list[str] = []
    for token in raw:
        glued = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", token)
        if glued and (glued.group(2) in _UNITS or glued.group(2) in {"mm", "m", "bar", "hz", "kw", "kg", "rpm", "g"}):
            split += [glued.group(1), glued.group(2)]
        else:
            split.append(token)
    tokens: list[str] = []
    i = 0
    while i < len(split):
        token = split[i]
        if _NUMBER.match(token):
            tokens.append(_canonical_number(token))
            nxt = tuple(split[i + 1:i + 3])
            if len(nxt) == 2 and nxt in _UNIT_PAIRS:
                tokens.append(_UNIT_PAIRS[nxt])
                i += 3
                continue
            if i + 1 < len(split) and split[i + 1] in _UNITS:
                tokens.append(_UNITS[split[i + 1]])
                i += 2
                continue
            i += 1
            continue
        if token not in _ARTICLES:
            tokens.append(token)
        i += 1
    return tokens


def normalize_answer(text: str) -> str:
    """The answer as one normalised string (tokens joined by single spaces)."""
    return " ".join(answer_tokens(text))


def _references(answer: str, aliases: Sequence[str] = ()) -> list[list[str]]:
    refs = [answer_tokens(a) for a in (answer, *aliases) if str(a).strip()]
    return [r for r in refs if r]


def exact_match(prediction: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """The normalised prediction equals the normalised answer or one of its aliases."""
    pred = answer_tokens(prediction)
    return any(pred == ref for ref in _references(answer, aliases))


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def contains_answer(prediction: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """The answer or an alias occurs in the prediction as whole tokens (so `8 N·m` is not found in `18 N·m`)."""
    pred = answer_tokens(prediction)
    return any(_contains(pred, ref) for ref in _references(answer, aliases))


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str, aliases: Sequence[str] = ()) -> float:
    """SQuAD-style token F1 on normalised tokens; the best over the answer and its aliases."""
    pred = answer_tokens(prediction)
    refs = [answer_tokens(r) for r in (reference, *aliases)]
    return max(_f1(pred, ref) for ref in refs)
