"""docs/provenance.md keeps up with the configs: every key a shipped config sets has a row saying where it comes from."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def dotted_keys(d: dict, prefix: str = "") -> set[str]:
    """{'a': {'b': 1}, 'c': 2} -> {'a.b', 'c'} (lists and values are leaves)."""
    out = set()
    for k, v in d.items():
        out |= dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_every_key_the_configs_set_has_a_provenance_row():
    rows = set(re.findall(r"^\| `([a-z0-9_.]+)`", (ROOT / "docs" / "provenance.md").read_text(), flags=re.M))
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    missing = {f"{k} ({p.name})" for p in configs for k in dotted_keys(yaml.safe_load(p.read_text()) or {})
               if k not in rows}
    assert not missing, f"add these keys to docs/provenance.md: {sorted(missing)}"
    assert dotted_keys({"a": {"b": 1, "c": [1]}, "d": 2}) == {"a.b", "a.c", "d"}
