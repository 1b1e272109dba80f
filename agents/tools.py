"""Tools the orchestrator can call: typed, documented functions whose schema comes from the signature.

Built-ins are safe by construction (arithmetic is parsed, never `eval`ed; nothing touches
files or the network). User tools are registered from a Python entry point (group
`atelier.tools`) or named `module:function` in the config. A tool's error is returned to
the model as a message ("error: ..."), never raised into the graph.

Each tool also carries `examples` (what the semantic router matches requests against) and,
optionally, `from_text`: a parser that pulls the arguments out of a plain request, so the
tool can answer in router-only mode, when no orchestrator model is there to fill them in.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from atelier.errors import AtelierError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "atelier.tools"


@dataclass
class ToolSpec:
    """A callable tool plus what routing needs to know about it."""

    name: str
    description: str
    function: Callable[..., Any]
    examples: list[str] = field(default_factory=list)
    from_text: Callable[[str], dict | None] | None = None

    @property
    def schema(self) -> dict:
        """The OpenAI-style function schema, derived from the signature and docstring."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        return convert_to_openai_tool(self.as_langchain())

    def as_langchain(self):
        from langchain_core.tools import StructuredTool

        return StructuredTool.from_function(self.function, name=self.name, description=self.description)

    def invoke(self, arguments: dict) -> str:
        """Run the tool; any failure comes back as an 'error: ...' string for the model to read."""
        try:
            validated = self.as_langchain().args_schema.model_validate(arguments or {}).model_dump()
            return str(self.function(**validated))
        except Exception as exc:  # a tool error is information for the model, not a crash
            log.info("tool %s failed: %s", self.name, exc)
            return f"error: {self.name} failed: {exc}"


# -- calculator ------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
              "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and len(node.args) <= 2):
        return _FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args))
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: + - * / // % ** and sqrt, log, exp, sin, cos, round, pi."""
    expression = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree)
    return f"{value:.10g}" if isinstance(value, float) else str(value)


_EXPRESSION = re.compile(r"(?:sqrt|log|exp|sin|cos|round|pi|[\d.(])[\d\s.+\-*/%^×÷()a-z]*[\d)]|\d+(?:\.\d+)?")


def _calculator_args(text: str) -> dict | None:
    candidates = [m.group(0).strip() for m in _EXPRESSION.finditer(text.lower())]
    candidates = [c for c in candidates if re.search(r"[+\-*/%^×÷(]", c) and re.search(r"\d", c)]
    return {"expression": max(candidates, key=len)} if candidates else None


# -- date and time ---------------------------------------------------------------------

def current_datetime(timezone: str = "UTC") -> str:
    """The current date and time in an IANA time zone such as UTC, Europe/Paris or America/New_York."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as Europe/Berlin") from None
    now = datetime.now(zone)
    return f"{now:%A %d %B %Y, %H:%M:%S} ({timezone}, UTC{now:%z})"


def _datetime_args(text: str) -> dict | None:
    match = re.search(r"\b([A-Z][a-z]+/[A-Z][A-Za-z_]+(?:/[A-Z][A-Za-z_]+)?)\b", text)
    return {"timezone": match.group(1)} if match else {"timezone": "UTC"}


# -- units -----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _units():
    import pint

    return pint.UnitRegistry(autoconvert_offset_to_baseunit=True)


_UNIT_ALIASES = {"°c": "degC", "celsius": "degC", "°f": "degF", "fahrenheit": "degF", "kelvin": "K",
                 "c": "degC", "f": "degF", "bar": "bar", "psi": "psi", "nm": "newton * meter", "n·m": "newton * meter",
                 "n m": "newton * meter", "rpm": "revolution / minute", "hp": "horsepower", "l": "liter",
                 "m3/h": "meter ** 3 / hour", "m³/h": "meter ** 3 / hour", "gpm": "gallon / minute"}


def _unit(name: str) -> str:
    return _UNIT_ALIASES.get(name.strip().lower(), name.strip())


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units, e.g. 80 N m to lbf ft, 3 bar to psi, 95 degC to degF."""
    registry = _units()
    try:
        quantity = registry.Quantity(value, _unit(from_unit)).to(_unit(to_unit))
    except Exception as exc:
        raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}: {exc}") from None
    return f"{value:g} {from_unit} = {quantity.magnitude:.6g} {to_unit}"


_CONVERSION = re.compile(r"(-?\d+(?:[.,]\d+)?)\s*([^\s\d][^\s]*(?:\s(?:m|ft|min|h))?)\s+(?:to|in|into|as)\s+"
                         r"([^\s?.!,]+(?:\s(?:ft|m|min|h))?)", re.IGNORECASE)


_HOW_MANY = re.compile(r"how many\s+(\S+(?:\s(?:ft|m|min|h))?)\s+(?:is|are|in)\s+(-?\d+(?:[.,]\d+)?)\s*([^\s?.!,]+"
                       r"(?:\s(?:ft|m|min|h))?)", re.IGNORECASE)


def _conversion_args(text: str) -> dict | None:
    if match := _HOW_MANY.search(text):
        return {"value": float(match.group(2).replace(",", ".")), "from_unit": match.group(3),
                "to_unit": match.group(1)}
    if match := _CONVERSION.search(text):
        return {"value": float(match.group(1).replace(",", ".")), "from_unit": match.group(2),
                "to_unit": match.group(3)}
    return None


def builtin_tools() -> list[ToolSpec]:
    return [
        ToolSpec("calculator", "Evaluate an arithmetic expression exactly (no code is run).", calculator,
                 examples=["what is 17 * 23", "calculate (4.5 + 3) / 2", "compute 2^10", "sqrt(144) + 7",
                           "how much is 1200 divided by 16", "what is 3 + 3?", "2 + 2", "what's 250 - 75",
                           "multiply 12 by 8", "what is 15 % of 80", "9 * 9 =", "add 45 and 17",
                           "what is 7 times 6", "evaluate 3.5 * (2 + 1)"], from_text=_calculator_args),
        ToolSpec("current_datetime", "The current date and time, optionally in a given time zone.", current_datetime,
                 examples=["what time is it", "what is today's date", "current time in Europe/Paris",
                           "which day of the week is it today", "what's the date today", "time now in UTC",
                           "what year is it", "tell me the current time in Asia/Tokyo"], from_text=_datetime_args),
        ToolSpec("convert_units", "Convert a quantity from one unit to another.", convert_units,
                 examples=["convert 80 N m to lbf ft", "how many psi is 3 bar", "95 degC in degF",
                           "convert 120 m3/h to gpm", "10 kW to hp", "how many mm is 2 inches", "5 bar in kPa",
                           "convert 3000 rpm to rad/s", "what is 40 °C in Fahrenheit", "how many liters is 10 gallons"],
                 from_text=_conversion_args),
    ]


def _load_reference(reference: str) -> ToolSpec:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise AtelierError(f"tool {reference!r} must be written module:function (e.g. mytools.lookup:find_part)")
    try:
        target = getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise AtelierError(f"cannot load tool {reference!r} ({exc}); check that the module is importable") from None
    if isinstance(target, ToolSpec):
        return target
    if not callable(target) or not (target.__doc__ or "").strip():
        raise AtelierError(f"tool {reference!r} must be a documented function (its docstring is its description)")
    return ToolSpec(target.__name__, target.__doc__.strip().splitlines()[0], target,
                    examples=list(getattr(target, "examples", [])), from_text=getattr(target, "from_text", None))


def load_tools(references: list[str] | None = None, *, include_entry_points: bool = True) -> list[ToolSpec]:
    """Built-ins, then entry-point tools (group `atelier.tools`), then `module:function` references."""
    tools = builtin_tools()
    if include_entry_points:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            tools.append(_load_reference(entry.value))
    for reference in references or []:
        tools.append(_load_reference(reference))
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AtelierError(f"two tools are named {', '.join(duplicates)}; rename one")
    return tools
