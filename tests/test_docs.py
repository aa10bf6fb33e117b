"""Execute the documentation: every ```python block of every docs page and of README.md.

Rules the pages follow (also stated in docs/faq.md, "Contributing to the docs"):

- All ```python blocks of one page run in order in one namespace, like a notebook, in a
  fresh temporary working directory; an exception fails the page's test, and the
  traceback points at the line of the Markdown file.
- A block that must not run is preceded (on the line just above its fence) by the marker
  ``<!-- docs-test: skip REASON -->``; the reason is mandatory. Use it sparingly.
- Other languages (bash, console, toml, text) are not executed; every command line that
  calls an ``examples/*.py`` script is checked against the options that script defines
  (and the setting or config file it names must exist).

Further checks keep the site honest: every public name of the package has an API
reference entry (``::: module.name``) and a docstring with an example (and a ``Shape:``
section where tensors are involved), every page is in the nav, the figure script runs and
writes both pictures, the static table of GPU-time estimates is what its code prints, and
the docstring rewriting of the site's griffe extension works.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
import runpy
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "scripts" not in p.parts)
MARKDOWN_FILES = [*PAGES, ROOT / "README.md"]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b(?P<reason>.*?)-->\s*$")


def _public_modules() -> list[str]:
    """``neokd_losses`` and every submodule without a leading underscore in its path."""
    import pkgutil

    import neokd_losses

    names = ["neokd_losses"]
    for info in pkgutil.walk_packages(neokd_losses.__path__, prefix="neokd_losses."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


@dataclass
class CodeBlock:
    path: Path
    line: int  # 1-based line of the first code line
    language: str
    source: str
    skip_reason: str | None


def extract_blocks(path: Path) -> list[CodeBlock]:
    """Return the fenced code blocks of a Markdown file, with their language and marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        info = match["info"].strip().split()
        language = info[0].lstrip(".{").rstrip("}") if info else ""
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(previous)
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise AssertionError(f"{path}:{i + 1}: unclosed code fence")
        blocks.append(
            CodeBlock(
                path=path,
                line=i + 2,
                language=language,
                source="\n".join(body) + "\n",
                skip_reason=skip["reason"].strip() if skip else None,
            )
        )
        i = j + 1
    return blocks


def _python_blocks(path: Path) -> list[CodeBlock]:
    return [b for b in extract_blocks(path) if b.language in {"python", "py"}]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_pages_exist() -> None:
    assert (DOCS / "index.md").is_file(), "docs/index.md is missing"
    assert len(PAGES) >= 10, f"expected the full site, found only {[_page_id(p) for p in PAGES]}"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=_page_id)
def test_skip_markers_have_reasons(path: Path) -> None:
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip().startswith("<!--") and "docs-test:" in text:
            match = _SKIP.match(text)
            assert match, f"{path}:{number}: unknown docs-test marker {text.strip()!r}"
            assert match["reason"].strip(), f"{path}:{number}: a skip marker needs a reason"


@pytest.mark.parametrize("path", [p for p in MARKDOWN_FILES if _python_blocks(p)], ids=_page_id)
def test_code_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the page's python blocks in order, in one namespace, in a temporary directory."""
    blocks = [b for b in _python_blocks(path) if b.skip_reason is None]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    # The snippets use tiny models: one thread is faster than two, and much faster when
    # the cores are shared (OpenMP threads then wait for each other at every operation).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in blocks:
            # Pad with blank lines so that tracebacks show the Markdown file's line numbers.
            code = compile("\n" * (block.line - 1) + block.source, str(block.path), "exec")
            exec(code, namespace)
    finally:
        torch.set_num_threads(threads)
        # Figures left open by a page would leak into the next one.
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")


def test_extract_blocks_reads_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- docs-test: skip needs a GPU -->\n"
        "```python\nraise SystemExit\n```\n\n- item\n\n    ```bash\n    ls\n    ```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [(b.language, b.line, b.skip_reason) for b in blocks] == [
        ("python", 4, None),
        ("python", 9, "needs a GPU"),
        ("bash", 15, None),
    ]
    assert blocks[2].source == "ls\n"


# --- API reference coverage ---------------------------------------------------------------

_DIRECTIVE = re.compile(r"^:::\s+(?P<target>[\w.]+)\s*$", re.MULTILINE)


def _documented_objects() -> dict[str, object]:
    found: dict[str, object] = {}
    for page in (DOCS / "api").glob("*.md"):
        for match in _DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            target = match["target"]
            module_name, _, attr = target.rpartition(".")
            try:
                module = importlib.import_module(target)
                found[target] = module
            except ImportError:
                module = importlib.import_module(module_name)
                found[target] = getattr(module, attr)
    return found


@pytest.mark.parametrize("module_name", _public_modules())
def test_every_public_name_has_an_api_entry(module_name: str) -> None:
    module = importlib.import_module(module_name)
    documented = _documented_objects()
    documented_ids = {id(obj) for obj in documented.values()}
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if isinstance(obj, (str, int, float, tuple)):  # __version__ and constants
            continue
        if isinstance(obj, types.ModuleType):
            continue
        if id(obj) not in documented_ids:
            missing.append(name)
    assert not missing, (
        f"{module_name}: no `::: ...` entry in docs/api/ for {missing}; add one to the "
        "matching API page."
    )


# Public names whose docstrings still lack a section the issue asks for. Shrink this as the
# docstrings are completed: the test fails when an entry is no longer needed.
KNOWN_DOCSTRING_GAPS: dict[str, set[str]] = {}


def _public_callables() -> dict[str, object]:
    found: dict[str, object] = {}
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.setdefault(name, obj)
    return found


def _docstring_gaps(obj: object) -> set[str]:
    doc = inspect.getdoc(obj) or ""
    gaps = set()
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return gaps  # exceptions and warnings need no example
    if not re.search(r"^Examples?:", doc, re.MULTILINE):
        gaps.add("Example")
    signatures = []
    for target in (obj, getattr(obj, "forward", None)):
        with contextlib.suppress(TypeError, ValueError):
            signatures.append(str(inspect.signature(target)))  # type: ignore[arg-type]
    annotations = " ".join(signatures) + " ".join(
        str(v) for v in getattr(obj, "__annotations__", {}).values()
    )
    if re.search(r"Tensor|ExitLogits", annotations) and not re.search(
        r"^Shape:", doc, re.MULTILINE
    ):
        gaps.add("Shape")
    return gaps


def test_public_docstrings_have_examples_and_shapes() -> None:
    """Every public class and function has an ``Example:`` and, with tensors, ``Shape:``."""
    found = {name: _docstring_gaps(obj) for name, obj in _public_callables().items()}
    new_gaps = {n: g - KNOWN_DOCSTRING_GAPS.get(n, set()) for n, g in found.items()}
    new_gaps = {n: g for n, g in new_gaps.items() if g}
    assert not new_gaps, f"public docstrings without these sections: {new_gaps}"
    stale = {n: g - found.get(n, set()) for n, g in KNOWN_DOCSTRING_GAPS.items()}
    stale = {n: g for n, g in stale.items() if g}
    assert not stale, f"remove these from KNOWN_DOCSTRING_GAPS, they are fixed: {stale}"


def test_api_entries_resolve() -> None:
    """Every ``:::`` target imports (mkdocstrings would fail the strict build otherwise)."""
    assert _documented_objects()


# --- navigation ------------------------------------------------------------------------------


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav_pages = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, re.MULTILINE))
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages == nav_pages, (
        f"pages not in the nav: {sorted(pages - nav_pages)}; "
        f"nav entries without a page: {sorted(nav_pages - pages)}"
    )


# --- figures ---------------------------------------------------------------------------------


def test_figure_script_writes_both_pictures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(sys, "argv", ["make_figures.py", "--out", str(tmp_path)])
    runpy.run_path(str(DOCS / "scripts" / "make_figures.py"), run_name="__main__")
    for name in ("neighbor_teacher.png", "orthogonal_masks.png"):
        written = tmp_path / name
        assert written.read_bytes().startswith(b"\x89PNG"), f"{name} is not a PNG"
        assert (DOCS / "figures" / name).is_file(), f"docs/figures/{name} is not committed"


# --- command lines of the examples -----------------------------------------------------------


def _script_flags(script: Path) -> set[str]:
    """The long options a script declares with ``add_argument("--name", ...)``."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            negatable = any(
                k.arg == "action" and getattr(k.value, "attr", "") == "BooleanOptionalAction"
                for k in node.keywords
            )
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    flags.add(str(arg.value))
                    if negatable:
                        flags.add("--no-" + str(arg.value)[2:])
    return flags


def _example_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in MARKDOWN_FILES:
        for block in extract_blocks(path):
            if block.language not in {"bash", "console", "sh", "shell"}:
                continue
            for raw in block.source.replace("\\\n", " ").splitlines():
                line = raw.split(" #")[0].strip().removeprefix("$ ")
                words = shlex.split(line) if line else []
                script = next(
                    (w for w in words if w.startswith("examples/") and w.endswith(".py")), None
                )
                if script is not None:
                    commands.append((f"{_page_id(path)}:{block.line}", words))
    return commands


@pytest.mark.parametrize(
    ("where", "words"), _example_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_example_commands_match_the_scripts(where: str, words: list[str]) -> None:
    script_name = next(w for w in words if w.startswith("examples/") and w.endswith(".py"))
    script = ROOT / script_name
    if not (ROOT / "examples").is_dir() or not script.is_file():
        pytest.fail(f"{where}: {script_name} does not exist")
    flags = _script_flags(script)
    arguments = words[words.index(script_name) + 1 :]
    if script_name == "examples/reproduce.py" and arguments and not arguments[0].startswith("-"):
        setting = ROOT / "examples" / "configs" / f"{arguments[0]}.toml"
        assert setting.is_file(), f"{where}: no setting {arguments[0]!r} ({setting} is missing)"
    for word in arguments:
        flag = word.split("=")[0]
        if flag.startswith("--"):
            assert (
                flag in flags
            ), f"{where}: {script_name} has no option {flag}; it has {sorted(flags)}"
        elif word.endswith(".toml"):
            assert (ROOT / word).is_file(), f"{where}: config {word} does not exist"


def test_gpu_estimate_table_matches_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static table on the reproducing page is what its code block prints."""
    import contextlib
    import io

    page = DOCS / "reproducing.md"
    text = page.read_text(encoding="utf-8")
    printed = io.StringIO()
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(printed):
        for block in _python_blocks(page):
            exec(compile(block.source, str(page), "exec"), {"__name__": "docs_reproducing"})
    rows = [line for line in printed.getvalue().splitlines() if line.startswith("|")]
    assert rows, "the reproducing page's code printed no table"
    missing = [row for row in rows if row not in text.splitlines()]
    assert not missing, f"docs/reproducing.md does not show these printed rows: {missing}"


def test_snippet_include_targets_exist() -> None:
    for page in PAGES:
        for target in re.findall(r'--8<--\s+"([^"]+)"', page.read_text(encoding="utf-8")):
            assert (ROOT / target).is_file(), f"{_page_id(page)} includes missing file {target}"


def test_griffe_extension_rewrites_rest_markup() -> None:
    pytest.importorskip("griffe")
    module = runpy.run_path(str(DOCS / "scripts" / "griffe_docstrings.py"))
    source = (
        "Summary with :math:`a_i +\n    b` and :func:`~neokd_losses.functional.neighbor_kd`.\n\n"
        "Layout::\n\n    x\n\n.. math::\n    L = \\sum_i x_i\n        + y\n\nAfter.\n\n"
        "Example:\n    >>> [1][0]\n    1"
    )
    assert module["rewrite"](source).splitlines() == [
        "Summary with \\(a_i + b\\) and `neighbor_kd`.",
        "",
        "Layout:",
        "",
        "    x",
        "",
        "$$",
        "L = \\sum_i x_i",
        "+ y",
        "$$",
        "",
        "After.",
        "",
        "Examples:",
        "    >>> [1][0]",
        "    1",
    ]
