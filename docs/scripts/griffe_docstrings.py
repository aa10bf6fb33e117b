"""A griffe extension that renders the package's docstrings well on the MkDocs site.

The docstrings follow the project's conventions (Google style with an ``Example:``
section, formulas as reStructuredText ``.. math::`` blocks and ``:math:`` roles, Sphinx
cross-reference roles such as ``:func:`~neokd_losses.functional.neighbor_kd```). Griffe
parses Google style but would show ``Example:`` as a plain admonition (so doctest output
such as ``[torch.Size([6, 5])]`` is read as Markdown) and keeps the reST markup verbatim.
Before parsing, this extension rewrites, in the docstring text only:

- ``Example:`` → ``Examples:`` (griffe's doctest-aware section);
- ``.. math::`` blocks → ``$$ … $$`` and ``:math:`…``` → ``\\( … \\)`` (rendered by
  pymdownx.arithmatex and MathJax);
- ``:func:`~a.b.c``` and the other Sphinx roles → ``c`` or ``a.b.c`` in code font;
- a paragraph ending in ``::`` (a reST literal block) → ending in ``:``.

Used from mkdocs.yml (``extensions: [docs/scripts/griffe_docstrings.py]``); the source
files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:func|class|meth|mod|attr|exc|data|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`"
)
_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`", re.DOTALL)
_LITERAL_MARKER = re.compile(r"(?<=\S)::$")


def _role(match: re.Match[str]) -> str:
    target = match["target"].strip()
    if match["tilde"]:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(lines: list[str]) -> list[str]:
    """Turn each ``.. math::`` directive and its indented body into a ``$$`` block."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = line[: len(line) - len(line.lstrip())]
            body: list[str] = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            out.extend([f"{indent}$$", *(f"{indent}{b}" for b in body if b), f"{indent}$$"])
            if i < len(lines) and lines[i].strip():
                out.append("")
            continue
        out.append(line)
        i += 1
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rewrite(text: str) -> str:
    """The docstring ``text`` with the rewrites listed in the module docstring."""
    lines = _math_blocks(text.splitlines())
    lines = [
        "".join((line[: _indent(line)], "Examples:")) if line.strip() == "Example:" else line
        for line in lines
    ]
    lines = [_LITERAL_MARKER.sub(":", line) for line in lines]
    result = "\n".join(lines)
    result = _MATH_ROLE.sub(lambda m: "\\(" + " ".join(m["body"].split()) + "\\)", result)
    return _ROLE.sub(_role, result)


class ReSTToMarkdown(griffe.Extension):
    """Rewrite every loaded docstring with :func:`rewrite` before it is parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
