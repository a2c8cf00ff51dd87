"""The code a submission runs, packed into one self-extracting Python file: what `bytes_code` counts.

Which code: each run's own. From the modules the stages making and scoring the artifact import
(RUNTIME_STAGES, followed through their pgolf imports by pgolf.pipeline.provenance.closure), the code
of every switch the run's config leaves off goes (pgolf.pipeline.features: `features.needed(cfg)`
names the features a config switches on; `build(on)` packs for them), then whatever no code that runs
reaches (pgolf.pipeline.reach): the CLI keeps the stages it packs, without help texts, and no tools.
Data preparation, shard ordering, the size check, reports and config validation are never in it.
The packer refuses a file whose code names what is not in it, except behind the switch whose code
went (reach.problems). docs/bytes.md has each preset's bytes.

Minified without changing what runs: docstrings, comments, function annotations, `if
TYPE_CHECKING:` blocks, `__all__` and argparse help texts go (nothing in these modules reads an
annotation or a docstring; the one visible change is that --help lists the options without
descriptions, which the readable source has), and each function's locals and parameters no caller
names, and the top-level names no attribute, string or local spells, get short names
(pgolf.pipeline.rename). ast.unparse writes the rest, with one space per indentation level and
spaces between tokens only where two tokens would otherwise run together. Every module is checked to
parse back to the tree ast.unparse wrote, so no token can change.

The file: `python train_gpt.py <stage> args` (or torchrun ... train_gpt.py <stage> args)
checks the CRC32 of its packed bytes (brotli has none: a damaged byte decodes to other code, which
fails far from the damage or runs), decompresses the modules into a dict, serves them to `import`
through a finder placed first on sys.meta_path (so an installed pgolf is never used), and runs
pgolf's CLI. The modules are brotli-compressed (quality 11: 4% smaller than lzma -9e here) and
held in a string literal of a latin-1 source file, where every byte is one character except the
five that a literal must escape (NUL, CR, LF, backslash, the quote): about 2% over the compressed
size, where the records' base85 (PR #1334) spends 25%. Kept free of torch, like provenance:
parsing the Snakefile builds each run's file to know its code bytes.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
import zlib
from pathlib import Path

import brotli

from pgolf.pipeline import features, reach, rename
from pgolf.pipeline.provenance import PACKAGE, closure
from pgolf.pipeline.stages import STAGES

RUNTIME_STAGES = tuple(s.name for s in STAGES if s.packed)
ENTRY = PACKAGE / "cli.py"
TABLE = PACKAGE / "pipeline" / "stages.py"
FILE_NAME = "train_gpt.py"  # the challenge's name for a submission's code

# Serves the packed modules: a package is a module with packed submodules (an empty __init__ is not
# packed), so __package__ and __path__ come out as they do from files; any other pgolf module is
# refused, so an installed pgolf (an editable install finds its modules by name) can never stand in.
# Filenames look like paths.
BOOTSTRAP = """# coding: latin-1
import sys,zlib,brotli,importlib.util as u
D='''{data}'''.encode('latin1')
if zlib.crc32(D)!={crc}:sys.exit(__file__+': damaged (its packed code fails its CRC32 check); copy the file again')
S=brotli.decompress(D).decode().split('\\0');M=dict(zip(S[::2],S[1::2]))
class F:
 def find_spec(s,n,p,t=None):
  k=any(m.startswith(n+'.')for m in M)
  if n in M or k:return u.spec_from_loader(n,s,is_package=k)
  if n[:6]=='pgolf.':raise ImportError(n+' is not packed')
 def create_module(s,p):0
 def exec_module(s,m):n=m.__name__;exec(compile(M.get(n,''),n.replace('.','/')+'.py','exec'),m.__dict__)
sys.meta_path.insert(0,F())
from pgolf.cli import main
main()
"""
# What runs: the bootstrap's `from pgolf.cli import main`, and the `cli` of each stage the table keeps.
BOOT = ("pgolf.cli", "main")
# Bytes a single-quoted literal of a latin-1 file cannot hold as themselves.
ESCAPES = {0: "\\x00", 10: "\\n", 13: "\\r", 39: "\\'", 92: "\\\\"}
# Those a literal in triple quotes cannot hold as themselves (a quote only before a quote or at the end).
QUOTE = 39
TRIPLE_ESCAPES = {0: "\\x00", 13: "\\r", 39: "\\'", 92: "\\\\"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def runtime_files() -> list[Path]:
    """The CLI and every module the runtime stages import, with the packages that hold them."""
    files = set(closure(["pgolf.cli", *(s.entry for s in STAGES if s.packed)]))
    for path in list(files):  # importing pgolf.quant.clip first imports pgolf and pgolf.quant
        for parent in path.relative_to(PACKAGE).parents:
            files.add(PACKAGE / parent / "__init__.py")
    return sorted(files)


class _OnlyPacked(ast.NodeTransformer):
    """The CLI's stage table with only the stages whose module is packed, each row cut to what the CLI
    reads (name, module, an empty help; `command`), and none of its tools: a submission runs stages."""

    def __init__(self, packed: set[str]) -> None:
        self.packed = packed

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if [getattr(t, "id", None) for t in node.targets] == ["TOOLS"] and isinstance(node.value, ast.Dict):
            node.value.keys, node.value.values = [], []
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if getattr(node.target, "id", None) == "STAGES" and isinstance(node.value, ast.Tuple):
            node.value.elts = [e for e in node.value.elts if ast.literal_eval(e.args[1]) in self.packed]
            for e in node.value.elts:
                e.args = [*e.args[:2], ast.Constant("")]
                e.keywords = [k for k in e.keywords if k.arg == "command"]
        return node


class _Strip(ast.NodeTransformer):
    """Drops what Python never executes (docstrings, function annotations, TYPE_CHECKING blocks) and
    the help texts of command-line options."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        args = node.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None:
                a.annotation = None
        node.returns = None
        node.body = [_plain_assign(s) for s in node.body]
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        if [getattr(t, "id", None) for t in node.targets] == ["__all__"]:  # only `import *` reads it
            return None
        return self.generic_visit(node)

    def visit_If(self, node: ast.If) -> ast.AST | None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" and not node.orelse:
            return None
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            node.keywords = [k for k in node.keywords if k.arg != "help" or _suppressed(k.value)]
        return self.generic_visit(node)


def _suppressed(value: ast.expr) -> bool:
    """help=argparse.SUPPRESS hides an option: that is behaviour, not a description, so it stays."""
    return isinstance(value, ast.Attribute) and value.attr == "SUPPRESS"


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _plain_assign(stmt: ast.stmt) -> ast.stmt:
    """`x: T = v` inside a function is `x = v`: local annotations are never evaluated."""
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
        return ast.Assign(targets=[stmt.target], value=stmt.value, lineno=stmt.lineno)
    return stmt


def stripped(source: str, name: str = "<source>") -> ast.Module:
    """The module's tree without docstrings, annotations, help texts and `__all__`."""
    return ast.fix_missing_locations(_Strip().visit(ast.parse(source, filename=name)))


def unparse(tree: ast.Module, name: str = "<source>") -> str:
    """The tree written by ast.unparse with one-space indents and no optional spaces."""
    return _squeezed(ast.unparse(tree), name)


@functools.lru_cache(maxsize=512)
def _minified(text: str, name: str, keywords: frozenset[str]) -> str:
    """A pruned module's text with its locals renamed, squeezed; once per text (most modules come out
    the same for every run's features). `keywords`: every keyword a call in the package passes."""
    return unparse(rename.rename_locals(_without_future(ast.parse(text)), keywords), name)


def _without_future(tree: ast.Module) -> ast.Module:
    """A module's top-level `x: T = v` as `x = v`; then, with no annotation left to postpone (function
    annotations went in stripping, and only class bodies keep theirs), no `from __future__ import
    annotations` either."""
    tree.body = [_plain_assign(s) for s in tree.body]
    if not any(isinstance(n, ast.AnnAssign) for n in ast.walk(tree)):
        tree.body = [s for s in tree.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    return ast.fix_missing_locations(tree)


@functools.lru_cache(maxsize=512)
def _squeezed(text: str, name: str) -> str:
    """`text` squeezed, checked to parse to the same tree; once per text (most modules come out the
    same for every run's features)."""
    out = _squeeze(text)
    if ast.dump(ast.parse(out)) != ast.dump(ast.parse(text)):
        raise RuntimeError(f"{name}: minifying changed the code")
    return out


def _squeeze(text: str) -> str:
    """ast.unparse's output with one-space indents and no space between tokens that do not need one.
    Token texts are copied verbatim (an f-string whole, from its start to its end token)."""
    lines = text.split("\n")
    out: list[str] = []
    prev: tokenize.TokenInfo | None = None
    depth, start = 0, None  # f-string nesting (Python 3.12+ tokenizes their insides) and where it began
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            if prev is not None:  # blank lines go
                out.append("\n")
            prev = None
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT):
            continue
        if tok.type == FSTRING_START:
            depth, start = depth + 1, start if depth else tok
        if depth:
            if tok.type == FSTRING_END:
                depth -= 1
            if depth:
                continue
            tok = tok._replace(string=_span(lines, start.start, tok.end), start=start.start)
        if prev is None:
            indent = len(lines[tok.start[0] - 1]) - len(lines[tok.start[0] - 1].lstrip(" "))
            out.append(" " * (indent // 4))
        elif tok.start[1] > prev.end[1] and _needs_space(prev, tok):
            out.append(" ")
        out.append(tok.string)
        prev = tok
    return "".join(out).rstrip("\n")


FSTRING_START, FSTRING_END = getattr(tokenize, "FSTRING_START", -1), getattr(tokenize, "FSTRING_END", -1)


def _span(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    if start[0] == end[0]:
        return lines[start[0] - 1][start[1] : end[1]]
    middle = lines[start[0] : end[0] - 1]
    return "\n".join([lines[start[0] - 1][start[1] :], *middle, lines[end[0] - 1][: end[1]]])


def _needs_space(prev: tokenize.TokenInfo, tok: tokenize.TokenInfo) -> bool:
    """Whether two tokens would run together: a name, keyword or number against a name, keyword,
    number or prefixed string; a number against a dot (`1 .real`)."""
    word = lambda c: c.isalnum() or c == "_"  # noqa: E731
    if prev.type == tokenize.NUMBER and (word(tok.string[0]) or tok.string[0] == "."):
        return True
    return word(prev.string[-1]) and word(tok.string[0])


def literal(data: bytes) -> str:
    """`data` as the inside of a single-quoted literal in a latin-1 file: byte i is character i."""
    return "".join(_escaped(data, i, ESCAPES) for i in range(len(data)))


def triple_literal(data: bytes) -> str:
    """`data` as the inside of a literal in triple single quotes in a latin-1 file, where a line feed
    and most quotes stand as themselves: a quote is escaped only before another quote or at the end
    (so no three close the literal early); NUL, CR and the backslash always are. The packed file is
    0.8% smaller than with `literal`."""
    return "".join(_escaped(data, i, TRIPLE_ESCAPES) if data[i] != QUOTE or data[i + 1 : i + 2] in (b"'", b"")
                   else "'" for i in range(len(data)))


def _escaped(data: bytes, i: int, escapes: dict[int, str]) -> str:
    b = data[i]
    if b == 0 and data[i + 1 : i + 2] not in (b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"):
        return "\\0"  # two bytes instead of four where no octal digit follows
    return escapes.get(b) or chr(b)


def minify(source: str, name: str = "<source>") -> str:
    """One module with what never runs removed (see stripped), written by unparse."""
    return unparse(stripped(source, name), name)


def modules(on: frozenset[str] | None = None) -> dict[str, str]:
    """Module name -> minified source, as the packed file of a run whose config switches on the
    features `on` holds them (pgolf.pipeline.features.needed; None: every feature), with the
    top-level names still readable (the file shortens them: packed_modules). The file must run: a
    name or module its code uses that went fails the build (reach.problems)."""
    return _checked(on)[0]


def packed_modules(on: frozenset[str] | None = None) -> dict[str, str]:
    """The modules as the file holds them: modules(on) with short top-level names, checked again."""
    mods, done = _checked(on)
    return _no_problems(_globals_renamed(mods), done)


def _checked(on: frozenset[str] | None) -> tuple[dict[str, str], reach.Cut]:
    trees = {module_name(p): ast.parse(_stripped_text(str(p), p.read_text())) for p in runtime_files()}
    done = reach.cut(trees, features.left_out(on) if on is not None else [])
    table = _OnlyPacked(set(trees))
    for name in (module_name(ENTRY), module_name(TABLE)):
        trees[name] = ast.fix_missing_locations(table.visit(trees[name]))
    roots = [BOOT, *((s.entry, "cli") for s in STAGES if s.packed and s.entry in trees)]
    keywords = frozenset().union(*(rename.keywords_of(t) for t in trees.values()))  # before pruning: more
    reach.prune(trees, roots)
    out = {m: _minified(ast.unparse(tree), m, keywords) for m, tree in trees.items()}
    return _no_problems(out, done), done


def _no_problems(mods: dict[str, str], done: reach.Cut) -> dict[str, str]:
    problems = reach.problems(mods, done)
    if problems:
        raise RuntimeError("the packed code would fail: " + "; ".join(problems))
    return mods


def _globals_renamed(mods: dict[str, str]) -> dict[str, str]:
    """The modules with short names for their top-level definitions (rename.rename_globals); what
    code outside them names keeps its name: the bootstrap's `main` and each stage's `cli`."""
    trees = {m: ast.parse(src) for m, src in mods.items()}
    rename.rename_globals(trees, frozenset({BOOT[1], "cli"}))
    return {m: unparse(tree, m) for m, tree in trees.items()}


def _packed(mods: dict[str, str]) -> dict[str, str]:
    """The modules the file holds: an empty package's __init__ goes (the bootstrap serves it)."""
    return {m: src for m, src in mods.items() if src or not any(k.startswith(m + ".") for k in mods)}


@functools.lru_cache(maxsize=128)
def _stripped_text(path: str, source: str) -> str:
    """The stripped module as text, parsed again for each build (cheaper than copying its tree)."""
    return ast.unparse(stripped(source, path))


@functools.lru_cache(maxsize=64)
def _build(on: frozenset[str] | None, stamp: tuple[tuple[str, int, int], ...]) -> bytes:
    mods = _packed(packed_modules(on))
    # in reverse name order: 0.3% smaller than in order
    joined = "\0".join(part for name in sorted(mods, reverse=True) for part in (name, mods[name]))
    packed = brotli.compress(joined.encode(), quality=11, lgwin=24)
    # {crc} first: the literal may hold the text "{crc}"
    return BOOTSTRAP.replace("{crc}", str(zlib.crc32(packed))).replace("{data}", triple_literal(packed)).encode(
        "latin-1")


def build(on: frozenset[str] | None = None) -> bytes:
    """The packed file's bytes for the features `on` (None: every feature); rebuilt only when a source
    file changed (parsing the Snakefile asks once per run)."""
    files = [*runtime_files(), *(Path(m.__file__) for m in (features, reach, rename)), Path(__file__)]
    return _build(on, tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def for_config(cfg: dict) -> bytes:
    """The packed file of a run: what its resolved config switches on."""
    return build(features.needed(cfg))


def code_bytes(on: frozenset[str] | None = None) -> int:
    return len(build(on))


def sources(on: frozenset[str] | None = None) -> dict[str, int]:
    """Source bytes of each module the packed file holds, for size.json: what it is made of."""
    packed = set(modules(on))
    return {str(p.relative_to(PACKAGE.parent)): p.stat().st_size for p in runtime_files() if module_name(p) in packed}
