"""Every run-config key is documented with its default (README.md, docs/aggregation.md).

Users read the README's tables to swap settings; a key added to pyproject.toml without a
row, or a default changed in one place only, would send them wrong.
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED_IN = ("README.md", "docs/aggregation.md")


def run_config() -> dict:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["flwr"]["app"]["config"]


def documented_defaults() -> dict[str, str]:
    """Each key named in a table row's first cell, with its default cell's text for it."""
    found: dict[str, str] = {}
    for name in DOCUMENTED_IN:
        for line in (ROOT / name).read_text().splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not line.startswith("| `") or len(cells) < 3:
                continue
            keys = [k for k in re.findall(r"`([^`]+)`", cells[0]) if "*" not in k]
            defaults = cells[1].split(", ")
            if len(defaults) == 1:
                defaults = defaults * len(keys)
            if len(defaults) != len(keys):
                defaults = [cells[1]] * len(keys)  # prose, not one default per key
            found.update(zip(keys, defaults, strict=True))
    return found


def matches(documented: str, expected: object) -> bool:
    """Whether a table's default (`0 (off)`, `` `channel` ``, empty, true) is `expected`."""
    text = re.sub(r"\s*\(.*\)$", "", documented).strip("`")
    if isinstance(expected, bool):
        return text == str(expected).lower()
    if isinstance(expected, str):
        return text == ("empty" if expected == "" else expected)
    try:
        return float(text) == float(expected)
    except ValueError:
        return False


def test_every_run_config_key_has_a_row():
    missing = sorted(set(run_config()) - set(documented_defaults()))
    assert not missing, f"run-config keys without a row in {DOCUMENTED_IN}: {missing}"


def test_every_documented_default_is_the_run_configs():
    documented = documented_defaults()
    wrong = {key: (documented[key], value) for key, value in run_config().items()
             if key in documented and not matches(documented[key], value)}
    assert not wrong, f"documented default vs pyproject.toml: {wrong}"


def test_a_changed_default_is_caught():
    assert matches("0.2", 0.2) and matches("0 (off)", 0.0) and matches("`channel`", "channel")
    assert matches("empty", "") and matches("true", True)
    assert not matches("0.5", 0.2) and not matches("false", True)
    assert not matches("`layer`", "channel")
