"""Short names for what the packed code names: about 9% fewer compressed bytes of code (locals about
4%, parameters 2.4% more, top-level definitions 3% more: rename_globals).

A function's local is renamed when renaming it cannot change what any code means: it is bound in the
function's own body only by plain assignment targets (`x = `, `for x in`, `with ... as x`,
`except ... as x`) or it is a parameter no caller can pass by keyword (see rename_locals), and no
scope inside the function binds the same name (so every `x` in the body, nested functions and comprehensions
included, is this variable). A function that calls locals(), vars(), eval() or exec(), or binds a name
with `:=` inside a comprehension, keeps its names. The new names are the shortest identifiers no code
in the function spells (its globals and builtins included), the most used local first; attributes,
keywords and strings never change, and an f-string's `{x=}` keeps its text (it is a constant in the
tree).
"""

from __future__ import annotations

import ast
import builtins
import itertools
import keyword
import string
from collections import Counter
from collections.abc import Iterator

_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, *_COMPREHENSIONS)
_DYNAMIC = frozenset({"locals", "vars", "eval", "exec"})


def rename_locals(tree: ast.AST, keywords: frozenset[str] = frozenset()) -> ast.AST:
    """Every function's locals renamed in place (outer functions first); returns the tree. A parameter
    is renamed too where no caller can name it: `*args` and `**kwargs`, a method's `self` or `cls`, and
    a plain function's parameter that no call in `keywords` (every keyword any call passes) spells.
    A method's other parameters keep their names: a library may call an override by keyword."""
    methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            _rename(node, _free_params(node, id(node) in methods, keywords))
    return tree


def keywords_of(tree: ast.AST) -> set[str]:
    """The keyword names the calls in `tree` pass."""
    return {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg}


def _free_params(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool, keywords: frozenset[str]) -> set[str]:
    """The parameters of `fn` no caller passes by name."""
    a = fn.args
    free = {s.arg for s in (a.vararg, a.kwarg) if s is not None}
    named = [*a.posonlyargs, *a.args]
    if not method:
        return free | {p.arg for p in [*named, *a.kwonlyargs] if p.arg not in keywords}
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    return free | ({named[0].arg} if named and not static else set())


def _body_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.AST]:
    """Every node of the function's body, nested scopes included (not its defaults or decorators,
    which the enclosing scope evaluates)."""
    for stmt in fn.body:
        yield from ast.walk(stmt)


def _own_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.AST]:
    """The nodes of the function's own scope: its body without what nested scopes hold."""
    todo: list[ast.AST] = list(fn.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo.extend(node.decorator_list)  # evaluated here
            if not isinstance(node, ast.ClassDef):
                todo.extend(d for d in [*node.args.defaults, *node.args.kw_defaults] if d is not None)


def _binds(node: ast.AST) -> set[str]:
    """The names a node binds other than by a plain Name target."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.alias):
        return {node.asname or node.name.partition(".")[0]}
    if isinstance(node, ast.Global | ast.Nonlocal):
        return set(node.names)
    if isinstance(node, ast.arg):
        return {node.arg}
    return set()


def _nested_bound(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Every name bound anywhere inside a scope nested in the function (conservatively, its own
    name and what its defaults bind too)."""
    out: set[str] = set()
    for scope in (n for n in _body_nodes(fn) if isinstance(n, _SCOPES)):
        for node in ast.walk(scope):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                out.add(node.id)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                out.add(node.name)
            out |= _binds(node)
    return out


def _short_names() -> Iterator[str]:
    for size in itertools.count(1):
        for letters in itertools.product(string.ascii_letters, repeat=size):
            name = "".join(letters)
            if not keyword.iskeyword(name) and not hasattr(builtins, name):
                yield name


def _rename(fn: ast.FunctionDef | ast.AsyncFunctionDef, free: set[str]) -> None:
    body = list(_body_nodes(fn))
    spelled = {n.id for n in body if isinstance(n, ast.Name)}
    if spelled & _DYNAMIC or any(isinstance(n, ast.NamedExpr) for c in body if isinstance(c, _COMPREHENSIONS)
                                 for n in ast.walk(c)):
        return
    params = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    stored, other = set(), set()
    for node in _own_nodes(fn):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            stored.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            stored.add(node.name)
        else:
            other |= _binds(node)
    nested = _nested_bound(fn)
    local = (stored | free) - (params - free) - other - nested
    uses = Counter(n.id for n in body if isinstance(n, ast.Name) and n.id in local)
    taken = spelled | params | other | nested
    names, new = (n for n in _short_names() if n not in taken), {}
    name = next(names)
    for old in sorted(local, key=lambda n: (-uses[n], n)):
        if len(name) < len(old):  # a local already as short keeps its name
            new[old], name = name, next(names)
    for node in [*(p for p in ast.walk(fn.args) if isinstance(p, ast.arg)), *body]:
        if isinstance(node, ast.arg) and node.arg in new:
            node.arg = new[node.arg]
        elif isinstance(node, ast.Name) and node.id in new:
            node.id = new[node.id]
        elif isinstance(node, ast.ExceptHandler) and node.name in new:
            node.name = new[node.name]



def rename_globals(trees: dict[str, ast.Module], keep: frozenset[str]) -> None:
    """Short names, in place, for the top-level functions, classes and constants of the packed
    modules (`trees`, module name -> tree), in their own module and wherever `from m import name`
    brings them. A name is renamed only where every spelling of it is certain to mean it, so not
    when any code binds the same name inside a function, class or comprehension (a local could
    shadow it), reads it as an attribute (`tensorfile.load`, `obj.load`: which one is meant is not
    followed), spells it as a string (the CLI finds each stage's `cli` by name) or imports it from a
    module that does not define it; nor a dunder, an exception class (error messages name their
    type), or a name in `keep` (what code outside the modules imports: the bootstrap's `main`). The
    new names are ones no module spells, so no two meanings meet."""
    spelled, blocked = set(), set(keep)
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                spelled.add(node.id)
            elif isinstance(node, ast.Attribute):
                blocked.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                blocked.add(node.value)
        blocked |= _bound_in_scopes(tree)
    defined = {m: _top_names(t) - blocked for m, t in trees.items()}  # a re-export is an alias: not defined
    imported = _imports(trees)
    uses = Counter(n.id for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.Name))
    fresh = (n for n in _short_names() if len(n) > 1 and n not in spelled and n not in blocked)
    refs = sorted(((m, n) for m, names in defined.items() for n in names), key=lambda k: (-uses[k[1]], k))
    new = {ref: next(fresh) for ref in refs}  # the most used first
    for module, tree in trees.items():
        local = {old: name for (m, old), name in new.items() if m == module}
        local |= {name: new[(source, name)] for (m, name), source in imported.items()
                  if m == module and (source, name) in new}
        _apply(tree, local, new)


def _top_names(tree: ast.Module) -> set[str]:
    """The names the module's own top-level statements bind by def, class (no exception) or plain
    assignment, less any its imports bind."""
    out, aliases = set(), set()
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            out.add(stmt.name)
        elif isinstance(stmt, ast.ClassDef) and not _is_exception(stmt):
            out.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            out |= {n.id for t in stmt.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.alias):
            aliases.add(node.asname or node.name.partition(".")[0])
    return {n for n in out - aliases if not (n.startswith("__") and n.endswith("__"))}


def _is_exception(cls: ast.ClassDef) -> bool:
    return cls.name.endswith(("Error", "Exception")) or any(
        isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in cls.bases)


def _bound_in_scopes(tree: ast.Module) -> set[str]:
    """Every name bound inside a function, lambda, class or comprehension of the module (nested
    scopes included, and conservatively what their decorators and defaults bind; a top-level def's
    own name is bound at module level, so not)."""
    out: set[str] = set()
    todo: list[tuple[ast.AST, bool]] = [(tree, False)]
    while todo:
        node, inside = todo.pop()
        if inside:
            out |= _binds(node)
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                out.add(node.id)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                out.add(node.name)
        inner = inside or isinstance(node, _SCOPES)
        todo.extend((c, inner) for c in ast.iter_child_nodes(node))
    return out


def _imports(trees: dict[str, ast.Module]) -> dict[tuple[str, str], str]:
    """(importing module, name) -> the packed module it comes from, for each `from m import name`
    of a packed module (an `as` alias keeps the importer's own spelling)."""
    out = {}
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in trees:
                out |= {(module, a.name): node.module for a in node.names if a.asname is None}
    return out


def _apply(tree: ast.Module, local: dict[str, str], new: dict[tuple[str, str], str]) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in local:
            node.id = local[node.id]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name in local:
            node.name = local[node.name]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for a in node.names:
                a.name = new.get((node.module, a.name), a.name)
