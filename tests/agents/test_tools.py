import sys

import pytest

from agents.tools import builtin_tools, calculator, convert_units, current_datetime, load_tools
from atelier.errors import AtelierError


@pytest.mark.parametrize("expression, value", [("17 * 23", "391"), ("(4.5 + 3) / 2", "3.75"), ("2^10", "1024"),
                                               ("sqrt(144) + 7", "19"), ("-3 ** 2", "-9"), ("10 % 4", "2")])
def test_calculator_evaluates_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("attack", ["__import__('os').system('id')", "open('/etc/passwd').read()", "(1).__class__",
                                    "[x for x in range(10)]", "9 ** 9 ** 9", "lambda: 1", "a = 1"])
def test_calculator_never_runs_code(attack):
    with pytest.raises(ValueError):
        calculator(attack)


def test_units_and_time():
    assert convert_units(3, "bar", "psi").endswith("43.5113 psi")
    assert "203" in convert_units(95, "°C", "°F")
    assert "59.005" in convert_units(80, "N m", "lbf ft")
    with pytest.raises(ValueError, match="cannot convert"):
        convert_units(1, "bar", "kg")
    assert "Europe/Paris" in current_datetime("Europe/Paris")
    with pytest.raises(ValueError, match="unknown time zone"):
        current_datetime("Mars/Olympus")


def test_arguments_from_plain_requests():
    tools = {t.name: t for t in builtin_tools()}
    assert tools["calculator"].from_text("what is 17 * 23?") == {"expression": "17 * 23"}
    assert tools["calculator"].from_text("what is the HX-65 torque") is None
    assert tools["convert_units"].from_text("how many psi is 3 bar") == {"value": 3.0, "from_unit": "bar",
                                                                         "to_unit": "psi"}
    assert tools["current_datetime"].from_text("time in America/New_York?") == {"timezone": "America/New_York"}


def test_schema_comes_from_the_signature_and_errors_are_messages():
    tool = {t.name: t for t in builtin_tools()}["convert_units"]
    params = tool.schema["function"]["parameters"]
    assert set(params["required"]) == {"value", "from_unit", "to_unit"}
    assert params["properties"]["value"]["type"] == "number"
    assert tool.invoke({"value": "lots", "from_unit": "bar", "to_unit": "psi"}).startswith("error: convert_units")
    assert tool.invoke({"value": 1, "from_unit": "bar", "to_unit": "kg"}).startswith("error:")


def test_user_tools_from_module_references(tmp_path, monkeypatch):
    (tmp_path / "mytools.py").write_text(
        "def find_part(code: str) -> str:\n    '''Look up a spare part by its code.'''\n    return 'part ' + code\n"
        "find_part.examples = ['find spare part MS-2']\n"
        "def undocumented(x: str) -> str:\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = {t.name: t for t in load_tools(["mytools:find_part"], include_entry_points=False)}
    assert tools["find_part"].invoke({"code": "MS-2"}) == "part MS-2"
    assert tools["find_part"].examples == ["find spare part MS-2"]
    with pytest.raises(AtelierError, match="documented function"):
        load_tools(["mytools:undocumented"], include_entry_points=False)
    with pytest.raises(AtelierError, match="module:function"):
        load_tools(["mytools"], include_entry_points=False)
    with pytest.raises(AtelierError, match="two tools are named calculator"):
        load_tools(["agents.tools:calculator"], include_entry_points=False)
    sys.modules.pop("mytools", None)
