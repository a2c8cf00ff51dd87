"""Code versions for Snakemake's rerun engine, which cannot see the modules a rule imports.

Policy: each stage gets a `code` param, a hash of the syntax trees of the modules that stage runs
(docstrings stripped, comments never reach the AST). Editing a stage's logic reruns that stage and
everything after it; reformatting or commenting reruns nothing. Kept free of torch so that a
Snakemake dry run stays fast.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

from pgolf.pipeline.stages import stage as stage_row

PACKAGE = Path(__file__).resolve().parent.parent  # pgolf/

def _module_path(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:  # `import pgolf` itself
        return PACKAGE / "__init__.py"
    rel = Path(*parts)
    for candidate in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _pgolf_imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "pgolf" or n.startswith("pgolf.")}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def module_files(stage: str) -> list[Path]:
    """The stage's entry module and every pgolf module it imports, transitively."""
    return closure([stage_row(stage).entry])


def closure(modules: list[str]) -> list[Path]:
    """The files of `modules` and of every pgolf module they import, transitively (imports inside
    functions too: a lazy import runs when its function does)."""
    todo, seen = list(modules), set()
    while todo:
        path = _module_path(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += _parsed(str(path), path.read_text())[0]
    return sorted(seen)


@functools.lru_cache(maxsize=512)
def _parsed(path: str, source: str) -> tuple[list[str], str]:
    """A module's pgolf imports and source hash, parsed once per text of the file: parsing the
    Snakefile hashes every stage's closure, and most modules are in several."""
    return sorted(_pgolf_imports(ast.parse(source, filename=path))), source_hash(source, path)


def canonical(node: object) -> str:
    """The syntax tree as text, the same on every Python 3.11+: fields left at None or an empty list
    are omitted, so a field a newer Python adds with an empty default (3.12's type_params) or a dump
    format change (3.13's show_empty) does not change the hash, and so are the empty f-string pieces
    3.12's parser adds; positions never enter it."""
    if isinstance(node, ast.JoinedStr):  # 3.12 leaves an empty piece after a nested format spec
        node = ast.JoinedStr([v for v in node.values if not (isinstance(v, ast.Constant) and v.value == "")])
    if isinstance(node, ast.AST):
        fields = [(name, getattr(node, name, None)) for name in node._fields]
        inner = ",".join(f"{name}={canonical(v)}" for name, v in fields if v is not None and v != [])
        return f"{type(node).__name__}({inner})"
    if isinstance(node, list):
        return "[" + ",".join(canonical(v) for v in node) + "]"
    return repr(node)


def source_hash(source: str, name: str = "<source>") -> str:
    """Hash of what a module's source does: comments, docstrings and formatting do not count."""
    tree = _strip_docstrings(ast.parse(source, filename=name))
    return hashlib.sha256(canonical(tree).encode()).hexdigest()


def code_version(stage: str) -> str:
    """Short hash of what the stage's code does, insensitive to comments and docstrings."""
    h = hashlib.sha256()
    for path in module_files(stage):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(_parsed(str(path), path.read_text())[1].encode())
    return h.hexdigest()[:16]


def code_files() -> list[Path]:
    """Every Python source of the package, as a record folder ships it to read and to rerun the
    pipeline. The counted code is another file: pgolf.pipeline.bundle packs what a submission runs."""
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
