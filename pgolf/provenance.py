"""Code versions for Snakemake's rerun engine, which cannot see the modules a rule imports.

Policy: each stage gets a `code` param, a hash of the syntax trees of the modules that stage runs
(docstrings stripped, comments never reach the AST). Editing a stage's logic reruns that stage and
everything after it; reformatting or commenting reruns nothing. Kept free of torch so that a
Snakemake dry run stays fast.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# Modules (globs relative to pgolf/) whose code decides each stage's output.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "fetch_corpus": ("data/corpus.py",),
    "documents": ("data/documents.py",),
    "tokenizer": ("data/tokenizer.py",),
    "shards": ("data/encode.py", "data/shards.py"),
    "train": ("model.py", "optim/*.py", "train/*.py", "data/shards.py", "tensorfile.py", "distributed.py"),
    "quantize": ("quant/rtn.py", "quant/quantize.py", "tensorfile.py"),
    "compress": ("quant/artifact.py", "quant/compress.py"),
    "size": ("quant/compress.py", "provenance.py"),
    "evaluate": ("eval/*.py", "model.py", "quant/rtn.py", "quant/quantize.py", "quant/artifact.py", "data/shards.py",
                 "tensorfile.py", "distributed.py"),
    "aggregate": ("report/*.py",),
}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def module_files(stage: str) -> list[Path]:
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODULES)}")
    files = {p for pattern in STAGE_MODULES[stage] for p in PACKAGE.glob(pattern)}
    return sorted(files)


def code_version(stage: str) -> str:
    """Short hash of what the stage's code does, insensitive to comments and docstrings."""
    h = hashlib.sha256()
    for path in module_files(stage):
        tree = _strip_docstrings(ast.parse(path.read_text(), filename=str(path)))
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(ast.dump(tree, include_attributes=False).encode())
    return h.hexdigest()[:16]


def code_files() -> list[Path]:
    """The Python sources that count as code in the artifact's size: the whole pgolf package."""
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def code_bytes() -> int:
    return sum(p.stat().st_size for p in code_files())
