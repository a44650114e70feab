"""Print ``name==version`` for every dependency of prefloss that has a lower bound in pyproject.toml.

The oldest-versions CI leg (`.ci/oldest-versions`) installs with these as pip constraints, so it runs
exactly the lower bounds pyproject.toml declares: raising a bound there changes what the leg tests.
Test tooling (pytest, ruff) is left to the resolver: it is not part of what prefloss promises.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

NOT_PROMISED = {"pytest", "ruff"}
LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")


def oldest_pins(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += [s for s in extra if not s.startswith("prefloss")]
    pins: dict[str, str] = {}
    for spec in specs:
        match = LOWER_BOUND.match(spec.split(";")[0])
        if match is None:
            raise SystemExit(
                f"{pyproject}: dependency {spec!r} has no plain lower bound (expected 'name>=X')"
            )
        name, version = match.group(1).lower(), match.group(2)
        if name in NOT_PROMISED:
            continue
        if pins.get(name, version) != version:
            raise SystemExit(f"{pyproject}: {name} has two lower bounds, {pins[name]} and {version}")
        pins[name] = version
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for name, version in sorted(oldest_pins(root / "pyproject.toml").items()):
        sys.stdout.write(f"{name}=={version}\n")
