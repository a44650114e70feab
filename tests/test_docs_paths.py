"""Every repository path the documentation names exists, and no text points at notes a clone lacks.

What is scanned: the whole text of README.md, CONTRIBUTING.md and docs/*.md; the docstrings (any
string-only statement) and comments of prefloss/**/*.py, kernels/*.py, tests/*.py, tests/workers/*.py,
bench/*.py and scripts/*.py; the comments of the other files in scripts/.

What counts as a path (`find_paths`):

1. a token that starts with a top-level folder of this repository (`TOP_DIRS`) followed by ``/``,
   e.g. ``prefloss/fused/op.py``, ``docs/``,
   ``tests/test_trl_dpo.py::test_prefloss_losses_first_step_float64``;
2. a root file name (`ROOT_FILES`) or any bare ``*.md`` name, resolved against the naming file's own
   folder first (a link between two pages of docs/), then the repository root;
3. a bare file name in single backticks with an extension in `BARE_EXTENSIONS` (``plan.py``,
   ``conftest.py``): it must be the name of some file in the repository, unless it is listed in
   `OTHER_PROJECTS_FILES` (a file of another project, named on purpose).

A ``::name`` suffix must name a ``def``/``class`` of that file (a ``[param-id]`` is dropped).
``*`` is a glob and ``<placeholder>`` stands for any name; either must match at least one path.
A trailing ``/`` requires a folder. A path in `MUST_NOT_EXIST` is named as absent on purpose: the test
checks that it is absent.

Not paths, by construction of the rules above (each with its reason):
- URLs (``https://...``): removed before matching; they are not in the repository.
- Paths under another root, i.e. preceded by ``/``, ``.``, ``$``, ``~``, ``-`` or a word character
  (``/tmp/...``, ``site-packages/prefloss/...``, ``$OUT/...``, ``./wheels/``, ``trl/trainer/...``):
  the file lives outside this repository (system, installed package, command output, other project).
- Output locations that commands write (``runs/...``, ``prefloss-output/...``, ``plots/``,
  ``results.json``, ``wheels/``): their top-level names are not in `TOP_DIRS` and ``.json`` is not in
  `BARE_EXTENSIONS`, so they are never taken for repository paths.
- Dotted module names (``prefloss.kernels``): Python import paths, checked by imports, not here.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TOP_DIRS = ("prefloss", "kernels", "tests", "docs", "scripts", "bench", "configs", ".ci")
ROOT_FILES = ("README.md", "CONTRIBUTING.md", "pyproject.toml", "Makefile", ".gitignore")
BARE_EXTENSIONS = (".py", ".sh", ".md", ".toml", ".yaml", ".yml", ".cfg")

# Bare file names (rule 3) that belong to other projects and are named as such.
OTHER_PROJECTS_FILES: dict[str, str] = {}
# Paths the text names as absent on purpose ("no `tests/__init__.py`"), with the reason.
MUST_NOT_EXIST = {
    "tests/__init__.py": "tests/ is not a package (pytest --import-mode=importlib): docs/design.md",
}

_URL = re.compile(r"https?://\S+")
_TOP = "|".join(re.escape(d) for d in TOP_DIRS)
_ROOT = "|".join(re.escape(f) for f in ROOT_FILES)
# The look-behind keeps paths under another root out (see the module docstring).
_PATH = re.compile(
    rf"(?<![\w./$~-])((?:{_TOP})/[\w.*<>/-]*|(?:{_ROOT})(?![\w.-])|[\w-][\w.-]*\.md(?![\w-]))"
    r"(::[\w\[\]-]+)?"
)
_BARE = re.compile(r"(?<![\w`])`([\w-][\w.-]*(?:" + "|".join(re.escape(e) for e in BARE_EXTENSIONS) + r"))`")


def _repository_files() -> list[Path]:
    """The repository's files (tracked and untracked, not git-ignored; no symbolic links)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks", "build", "dist"}
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
    paths = [ROOT / n for n in names]
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


FILES = _repository_files()
BASENAMES = {p.name for p in FILES}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _docs_sources() -> list[Path]:
    """Files whose text is scanned (see the module docstring)."""
    out = []
    for p in FILES:
        rel = _rel(p)
        top = rel.split("/")[0]
        if rel in ("README.md", "CONTRIBUTING.md") or (top == "docs" and p.suffix == ".md"):
            out.append(p)
        elif top == "prefloss" and p.suffix == ".py":
            out.append(p)
        elif top in ("kernels", "tests", "bench") and p.suffix == ".py" and rel.count("/") == 1:
            out.append(p)
        elif rel.startswith("tests/workers/") and p.suffix == ".py" and rel.count("/") == 2:
            out.append(p)
        elif top == "scripts" and rel.count("/") == 1:
            out.append(p)
    return out


def _python_texts(source: str) -> list[tuple[int, str]]:
    """(first line, raw text) of every comment and string-only statement (docstrings)."""
    texts = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            texts.append((tok.start[0], tok.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                texts.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return texts


def _shell_comments(source: str) -> list[tuple[int, str]]:
    texts = []
    for number, line in enumerate(source.splitlines(), 1):
        if "#" in line and not line.startswith("#!"):
            texts.append((number, line[line.index("#") :]))
    return texts


def texts_of(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) pieces of ``path`` that are documentation."""
    source = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return [(1, source)]
    if path.suffix == ".py":
        return _python_texts(source)
    return _shell_comments(source)


def find_paths(text: str) -> list[tuple[int, str, str]]:
    """(line offset in ``text``, kind, token): kind ``"path"`` (rules 1-2) or ``"bare"`` (rule 3)."""
    text = _URL.sub(lambda m: " " * len(m.group()), text)
    found = []
    for m in _PATH.finditer(text):
        token = m.group(1).rstrip(".")
        if m.group(2):
            token += m.group(2)
        found.append((text.count("\n", 0, m.start()), "path", token))
    for m in _BARE.finditer(text):
        found.append((text.count("\n", 0, m.start()), "bare", m.group(1)))
    return found


def _glob(pattern: str) -> list[Path]:
    return list(ROOT.glob(re.sub(r"<[^<>/]*>", "*", pattern)))


def problem(token: str, kind: str, naming_file: Path) -> str | None:
    """Why ``token`` (named in ``naming_file``) does not resolve, or None when it does."""
    if kind == "bare":
        if token in BASENAMES or token in OTHER_PROJECTS_FILES:
            return None
        return "no file of that name in the repository"
    if token in MUST_NOT_EXIST:
        return "exists, but is named as absent on purpose" if (ROOT / token).exists() else None
    path, _, name = token.partition("::")
    name = name.split("[")[0]
    if "/" not in path.rstrip("/"):  # a root file or bare *.md: the naming file's folder, then the root
        candidates = [naming_file.parent / path, ROOT / path]
    elif "*" in path or "<" in path:
        candidates = _glob(path.rstrip("/"))
        if not candidates:
            return "the pattern matches nothing"
    else:
        candidates = [ROOT / path]
    hits = [c for c in candidates if (c.is_dir() if path.endswith("/") else c.exists())]
    if not hits:
        return "no such folder" if path.endswith("/") else "no such file"
    if name:
        definition = re.compile(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b", re.M)
        if not any(definition.search(h.read_text(encoding="utf-8")) for h in hits if h.is_file()):
            return f"no def/class {name!r} in it"
    return None


def dangling_references(sources: list[Path]) -> list[str]:
    """``file:line: token (why)`` for every path named in ``sources`` that does not resolve."""
    out = []
    for source in sources:
        for first_line, text in texts_of(source):
            for offset, kind, token in find_paths(text):
                why = problem(token, kind, source)
                if why:
                    out.append(f"{_rel(source)}:{first_line + offset}: {token} ({why})")
    return out


def test_every_named_repository_path_exists():
    sources = _docs_sources()
    assert {"README.md", "CONTRIBUTING.md", "docs/design.md"} <= {_rel(p) for p in sources}
    missing = dangling_references(sources)
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("see `prefloss/no_such_module.py` for", "prefloss/no_such_module.py (no such file)"),
        ("tests/test_docs_paths.py::test_no_such_test", "no def/class 'test_no_such_test'"),
        ("the glob `prefloss/losses/*_nothing.py`", "(the pattern matches nothing)"),
        ("a page [x](no-such-page.md)", "no-such-page.md (no such file)"),
        ("a folder `docs/no_such_dir/`", "docs/no_such_dir/ (no such folder)"),
        ("bare `no_such_helper.py` name", "no_such_helper.py (no file of that name"),
    ],
    ids=["file", "test-name", "glob", "md-link", "folder", "bare-name"],
)
def test_made_up_paths_are_reported(text, expected):
    page = ROOT / "docs" / "design.md"
    found = [(o, k, t) for o, k, t in find_paths(text) if problem(t, k, page)]
    assert found, f"nothing reported for {text!r}"
    offset, kind, token = found[0]
    assert expected in f"{token} ({problem(token, kind, page)})"


@pytest.mark.parametrize(
    "text",
    [
        "https://github.com/fla-org/flash-linear-attention/tree/main/docs/x.md",
        "/tmp/tests/x.py and site-packages/prefloss/none.py and $OUT/docs/y.json",
        "writes runs/alpha_dpo/ and prefloss-output/ and --json results.json",
        "`prefloss.kernels` and `prefloss/losses/<name>.py` and `tests/test_trl_*.py`",
        "tests/test_docs_paths.py::test_made_up_paths_are_reported[file] and `conftest.py`",
    ],
    ids=["url", "other-roots", "outputs", "module-template-glob", "param-id-bare"],
)
def test_what_is_not_reported(text):
    page = ROOT / "docs" / "design.md"
    assert [t for _, k, t in find_paths(text) if problem(t, k, page)] == []


# The names of the developers' private notes, built so that this file does not contain them.
_PRIVATE_NOTES = [name + ".md" for name in ("DESIGN", "SPEC", "STYLE", "ENVIRONMENT")]


def test_no_file_points_at_private_notes():
    """The repository stands alone: no file names notes that a clone does not have."""
    hits = []
    for path in FILES:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits += [f"{_rel(path)}:{number}: {n}" for n in _PRIVATE_NOTES if n in line]
    assert not hits, "\n".join(hits)
