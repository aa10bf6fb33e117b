"""The documentation site: it renders without network, and API pages show the user's API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torchattacks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _list_under(key: str) -> list[str]:
    """The items of a top-level YAML list in mkdocs.yml (``key:`` then ``  - item`` lines)."""
    lines = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").splitlines()
    if f"{key}:" not in lines:
        return []
    items = []
    for line in lines[lines.index(f"{key}:") + 1 :]:
        match = re.match(r"^\s+-\s+(\S+)\s*$", line)
        if not match:
            break
        items.append(match[1])
    return items


@pytest.mark.parametrize("key", ["extra_javascript", "extra_css"])
def test_site_assets_are_bundled(key: str) -> None:
    """No script or style sheet comes from a CDN: the site must render offline."""
    for item in _list_under(key):
        assert not re.match(r"^(https?:)?//", item), f"{key} loads {item} from the network"
        assert (DOCS / item).is_file(), f"{key}: docs/{item} does not exist"


def test_mathjax_is_bundled() -> None:
    scripts = _list_under("extra_javascript")
    assert any(s.startswith("javascripts/mathjax/") for s in scripts), scripts
    assert (DOCS / "javascripts" / "mathjax" / "LICENSE").is_file()


def _entries(page: Path) -> dict[str, str]:
    """``::: target`` entries of an API page and the options block under each."""
    text = page.read_text(encoding="utf-8")
    found = re.finditer(r"^:::\s+(?P<target>[\w.]+)\s*\n(?P<options>(?:[ \t]+.*\n)*)", text, re.M)
    return {m["target"]: m["options"] for m in found}


def test_attack_pages_hide_torchattacks_plumbing() -> None:
    """Classes built on torchattacks.Attack list their members explicitly, none of torchattacks'."""
    import importlib

    plumbing = {name for name in vars(torchattacks.attack.Attack) if not name.startswith("__")}
    plumbing |= {"__call__", "forward"}
    checked = 0
    for page in sorted((DOCS / "api").glob("*.md")):
        for target, options in _entries(page).items():
            module, _, name = target.rpartition(".")
            obj = getattr(importlib.import_module(module), name)
            if not (isinstance(obj, type) and issubclass(obj, torchattacks.attack.Attack)):
                continue
            checked += 1
            members = re.findall(r"^\s+-\s+(\w+)\s*$", options, re.M)
            assert "members:" in options, f"{page.name}: {target} has no `members:` list"
            # Members this library defines (on the class or its multi-exit base) carry
            # our docstrings; torchattacks' own are not shown.
            ours = set().union(
                *(vars(c) for c in obj.__mro__ if c.__module__.startswith("neokd_losses"))
            )
            shown = set(members) & plumbing - ours
            assert not shown, f"{page.name}: {target} shows torchattacks' {sorted(shown)}"
            # mkdocstrings silently drops a listed member the class inherits unless told.
            inherited = set(members) - set(vars(obj))
            assert not inherited or "inherited_members: true" in options, (
                f"{page.name}: {target} lists inherited {sorted(inherited)} without "
                "`inherited_members: true`, so the site would not show them"
            )
            assert not set(members) & {"__call__", "forward", "get_logits", "set_model"}
    assert checked >= 2
