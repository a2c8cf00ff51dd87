"""What of the packed modules can run, followed by module and not by spelling, and what goes.

A top-level definition is reached when code that runs names it: a bare name in its own module, an
import of it (`from pgolf.m import f`, then `f`), an attribute of its module (`tensorfile.load`,
`tensorfile` being `from pgolf.formats import tensorfile`), or a root the caller gives (the CLI's
`main`, each packed stage's `cli`). Code that runs is a reached definition, and each imported
module's other top-level statements (they run on import); a module is imported when reached code
imports it. `x.decode()` does not keep caseops.decode: an attribute counts only on a module.

Everything else goes: a definition nothing reached names, an import alias nothing reached uses, a
module nothing reached imports. Only what does nothing but bind its name may go: functions and
classes whose decorators only wrap them (WRAPPERS), and assignments of expressions without calls;
any other statement stays. No scopes are tracked: a local variable spelled like a top-level name
keeps that name (conservative, never wrong). Methods go with their class or stay with it.

`cut` removes what the config leaves off before reach runs (pgolf.pipeline.features: a module, a
definition, a method, or an entry of a top-level dict); the imports of what it removed go too, so
the names they bound are undefined where reached code still spells them (in branches the same switch
guards). `problems` checks the minified modules: a global name nothing binds is allowed only where
`cut` removed it and never in code that runs on import, and every pgolf import and module attribute
must resolve to what is packed or to what `cut` removed.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
import symtable
from dataclasses import dataclass, field

Ref = tuple[str, str]  # (module, top-level name)
# Decorators that return the function or class they wrap and register it nowhere.
WRAPPERS = frozenset({"dataclass", "no_grad", "inference_mode", "contextmanager"})
# module, module:name, module:Class.method, module:NAME[key]
ENTRY = re.compile(r"^([\w.]+)(?::(\w+)(?:\.(\w+)|\[(\w+)\])?)?$")


@dataclass
class _Module:
    name: str
    tree: ast.Module
    defs: dict[str, ast.stmt] = field(default_factory=dict)  # droppable definition by each name it binds
    aliases: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # import alias -> (module, name)
    imports: dict[str, str] = field(default_factory=dict)  # import alias -> the module its statement runs
    roots: list[ast.stmt] = field(default_factory=list)  # statements that run on import


def _droppable_names(stmt: ast.stmt) -> list[str]:
    """The names a statement binds if binding them is all it does, else []."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [stmt.name] if all(_decorator(d) in WRAPPERS for d in stmt.decorator_list) else []
    if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None and _pure(stmt.value):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = [n for t in targets for n in _target_names(t)]
        return names if names and None not in names else []
    return []


def _target_names(t: ast.expr) -> list[str | None]:
    if isinstance(t, ast.Name):
        return [t.id]
    if isinstance(t, ast.Tuple):
        return [n for e in t.elts for n in _target_names(e)]
    return [None]


def _pure(value: ast.expr) -> bool:
    """Whether evaluating an expression only builds a value: no call runs (a lambda's body waits)."""
    if isinstance(value, ast.Call | ast.Await | ast.Yield | ast.YieldFrom | ast.NamedExpr):
        return False
    if isinstance(value, ast.Lambda):
        return all(_pure(d) for d in [*value.args.defaults, *value.args.kw_defaults] if d is not None)
    return all(_pure(c) for c in ast.iter_child_nodes(value))


def _decorator(d: ast.expr) -> str | None:
    d = d.func if isinstance(d, ast.Call) else d
    return d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else None


def _imported(stmt: ast.Import | ast.ImportFrom) -> list[tuple[str, str, str | None]]:
    """(alias bound, module, name or None for the module itself) of each alias of an import; the
    module is the one the alias names (`import a.b` binds a, and imports a.b: see _loads)."""
    if isinstance(stmt, ast.Import):
        return [(a.asname, a.name, None) if a.asname else (a.name.partition(".")[0], a.name.partition(".")[0], None)
                for a in stmt.names]
    return [(a.asname or a.name, stmt.module or "", a.name) for a in stmt.names]


def _loads(stmt: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(module, name) of what an import statement runs: `import a.b` runs a.b."""
    if isinstance(stmt, ast.Import):
        return [(a.name, None) for a in stmt.names]
    return [(stmt.module or "", a.name) for a in stmt.names]


def _index(name: str, tree: ast.Module) -> _Module:
    m = _Module(name, tree)
    for stmt in tree.body:
        names = _droppable_names(stmt)
        if isinstance(stmt, ast.Import) or isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
            for (alias, mod, sub), (run, _) in zip(_imported(stmt), _loads(stmt), strict=True):
                m.aliases[alias], m.imports[alias] = (mod, sub), run
        elif names:
            m.defs.update(dict.fromkeys(names, stmt))
        else:
            m.roots.append(stmt)
    return m


class _Reach:
    def __init__(self, trees: dict[str, ast.Module]) -> None:
        self.mods = {name: _index(name, tree) for name, tree in trees.items()}
        self.loaded: set[str] = set()
        self.live: set[int] = set()  # id() of reached definition statements
        self.used: dict[str, set[str]] = {name: set() for name in trees}  # names reached code spells

    def load(self, module: str) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            name = ".".join(parts[:i])
            if name in self.mods and name not in self.loaded:
                self.loaded.add(name)
                for stmt in self.mods[name].roots:
                    self.scan(name, stmt)

    def reach(self, module: str, name: str | None) -> None:
        """`module`'s `name` (its top-level binding), or the module itself when name is None."""
        if name is not None and f"{module}.{name}" in self.mods:  # `from pgolf.formats import tensorfile`
            module, name = f"{module}.{name}", None
        if module not in self.mods:
            return
        self.load(module)
        if name is None:
            return
        m = self.mods[module]
        self.used[module].add(name)
        stmt = m.defs.get(name)
        if stmt is not None and id(stmt) not in self.live:
            self.live.add(id(stmt))
            self.scan(module, stmt)
        elif name in m.aliases:  # a name this module imported and another imports from it
            self.reach(*m.aliases[name])

    def scan(self, module: str, node: ast.AST) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                self.name(module, n.id)
            elif isinstance(n, ast.Attribute):
                target = self.module_of(module, n.value)
                if target is not None:
                    self.reach(target, n.attr)
            elif isinstance(n, ast.Import | ast.ImportFrom):  # one inside a function runs when it does
                for mod, sub in _loads(n):
                    self.reach(mod, sub)

    def name(self, module: str, name: str) -> None:
        m = self.mods[module]
        if name in m.defs:
            self.reach(module, name)
        elif name in m.aliases and name not in self.used[module]:
            self.used[module].add(name)
            self.reach(*m.aliases[name])
            self.load(m.imports[name])
        self.used[module].add(name)

    def module_of(self, module: str, node: ast.expr) -> str | None:
        """The packed module an expression names (`tensorfile`, `pgolf.formats`), or None."""
        if isinstance(node, ast.Name):
            mod, sub = self.mods[module].aliases.get(node.id, (None, None))
            full = mod if sub is None else f"{mod}.{sub}"
            return full if full in self.mods else None
        if isinstance(node, ast.Attribute):
            base = self.module_of(module, node.value)
            full = f"{base}.{node.attr}" if base is not None else None
            return full if full in self.mods else None
        return None


def prune(trees: dict[str, ast.Module], roots: list[Ref]) -> list[str]:
    """Remove, in place, what the `roots` never reach (see the module docstring); modules nothing
    imports leave `trees`. Returns the 'module.name's of the definitions and the modules removed."""
    r = _Reach(trees)
    for module, name in roots:
        r.reach(module, name)
    removed = [m for m in trees if m not in r.loaded]
    for m in removed:
        del trees[m]
    for name, tree in trees.items():
        mod, body = r.mods[name], []
        for stmt in tree.body:
            if stmt in mod.roots or id(stmt) in r.live:
                body.append(stmt)
            elif isinstance(stmt, ast.Import | ast.ImportFrom):
                kept = [a for a, (alias, _, _) in zip(stmt.names, _imported(stmt), strict=True)
                        if alias in r.used[name]]
                if kept:
                    stmt.names = kept
                    body.append(stmt)
            else:
                removed += [f"{name}.{n}" for n in _droppable_names(stmt)]
        tree.body = body  # an empty module is an empty file
    return removed


@dataclass
class Cut:
    """What `cut` removed: (module, name) refs, name None for a whole module, and per module the
    import aliases that named them (undefined there now)."""

    refs: set[tuple[str, str | None]] = field(default_factory=set)
    names: dict[str, set[str]] = field(default_factory=dict)

    def removed(self, module: str, name: str | None) -> bool:
        return (module, None) in self.refs or (module, name) in self.refs or (f"{module}.{name}", None) in self.refs


def cut(trees: dict[str, ast.Module], entries: list[str]) -> Cut:
    """Remove, in place, each entry: 'module', 'module:name' (a top-level definition),
    'module:Class.method' (a method no base class defines: a call reaching it fails, never falls back)
    or 'module:NAME[key]' (an entry of a top-level dict literal), and the import aliases that bound
    what was removed. An entry of a module already removed is nothing more to remove."""
    done = Cut()
    for entry in entries:
        m = ENTRY.match(entry)
        if m is None:
            raise RuntimeError(f"{entry!r}: not 'module', 'module:name', 'module:Class.method' or 'module:NAME[key]'")
        module, name, method, key = m.groups()
        if (module, None) in done.refs:
            continue
        if module not in trees:
            raise RuntimeError(f"{entry}: no packed module {module}")
        if name is None:
            del trees[module]
            done.refs.add((module, None))
        elif method is not None:
            _remove_method(trees[module], name, method, entry)
        elif key is None:
            _remove_definition(trees[module], name, entry)
            done.refs.add((module, name))
            done.names.setdefault(module, set()).add(name)
        else:
            _remove_key(trees[module], name, key, entry)
    for module, tree in trees.items():
        for block in _blocks(tree):
            kept = []
            for node in block:
                if isinstance(node, ast.Import | ast.ImportFrom):
                    node.names = [a for a, (alias, mod, sub) in zip(node.names, _imported(node), strict=True)
                                  if not _gone(done, module, alias, mod, sub, a.name, isinstance(node, ast.Import))]
                    if not node.names:
                        continue
                kept.append(node)
            block[:] = kept or ([] if block is tree.body else [ast.Pass()])
    return done


def _gone(done: Cut, module: str, alias: str, mod: str, sub: str | None, name: str, plain: bool) -> bool:
    """Whether an import alias bound something `cut` removed (then noted as undefined in `module`)."""
    if done.removed(mod, sub) or (plain and done.removed(name, None)):
        done.names.setdefault(module, set()).add(alias)
        return True
    return False


def _blocks(tree: ast.Module) -> list[list[ast.stmt]]:
    """Every statement list of the module, nested ones included (only a statement can import):
    walking statements alone skips the expressions, most of a tree."""
    out: list[list[ast.stmt]] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, attr, None)
            if isinstance(block, list) and block:
                if isinstance(block[0], ast.stmt):
                    out.append(block)
                todo += block
    return out


def _remove_definition(tree: ast.Module, name: str, entry: str) -> None:
    for stmt in tree.body:
        if name in _droppable_names(stmt):
            if len(_droppable_names(stmt)) > 1:
                raise RuntimeError(f"{entry}: its statement binds other names too")
            tree.body.remove(stmt)
            return
    raise RuntimeError(f"{entry}: no plain top-level definition of {name}")


def _remove_method(tree: ast.Module, cls: str, method: str, entry: str) -> None:
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name == cls:
            for node in stmt.body:
                if isinstance(node, ast.FunctionDef) and node.name == method and not method.startswith("__"):
                    stmt.body.remove(node)
                    stmt.body = stmt.body or [ast.Pass()]
                    return
    raise RuntimeError(f"{entry}: no method {method} (not a dunder) of a top-level class {cls}")


def _remove_key(tree: ast.Module, name: str, key: str, entry: str) -> None:
    for stmt in tree.body:
        if _droppable_names(stmt) == [name] and isinstance(stmt.value, ast.Dict):
            d = stmt.value
            keep = [(k, v) for k, v in zip(d.keys, d.values, strict=True)
                    if not (isinstance(k, ast.Constant) and k.value == key)]
            if len(keep) == len(d.keys):
                raise RuntimeError(f"{entry}: {name} has no key {key!r}")
            d.keys, d.values = [k for k, _ in keep], [v for _, v in keep]
            return
    raise RuntimeError(f"{entry}: no top-level dict {name}")


@dataclass(frozen=True)
class _Facts:
    """What problems() needs of one module's source, found once per text."""

    on_import: frozenset[str]  # free global names used by code that runs on import
    later: frozenset[str]  # free global names used by functions
    bound: frozenset[str]  # its top-level names
    imports: tuple[tuple[str, str | None], ...]  # (module, name) of every import it runs
    attributes: tuple[tuple[str, str, str], ...]  # (alias, module the alias names, attribute)


@functools.lru_cache(maxsize=512)
def _facts(source: str, name: str) -> _Facts:
    top = symtable.symtable(source, name, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    on_import: set[str] = set()
    later: set[str] = set()
    todo = [(top, True)]
    while todo:
        table, runs = todo.pop()
        todo += [(c, runs and c.get_type() == "class") for c in table.get_children()]
        for s in table.get_symbols():
            if s.is_global() and s.is_assigned():  # `global x` then `x = ...` in a function
                bound.add(s.get_name())
            if s.is_referenced() and (s.is_global() or table is top):
                (on_import if runs else later).add(s.get_name())
    tree = ast.parse(source)
    aliases = {alias: mod if sub is None else f"{mod}.{sub}" for s in tree.body
               if isinstance(s, ast.Import | ast.ImportFrom) for alias, mod, sub in _imported(s)}
    imports = tuple(ref for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for ref in _loads(n))
    attributes = tuple((n.value.id, aliases[n.value.id], n.attr) for n in ast.walk(tree)
                       if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases)

    def free(names: set[str]) -> frozenset[str]:
        return frozenset(n for n in names - bound if not hasattr(builtins, n))

    top_names = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    return _Facts(free(on_import), free(later), frozenset(top_names | bound), imports, attributes)


def problems(sources: dict[str, str], done: Cut) -> list[str]:
    """What would fail in the packed modules: a global name nothing binds (allowed only where `cut`
    removed it, and never in code that runs on import), a pgolf module or name imported that is
    not packed, an attribute of a packed module that it does not define; `cut`'s removals excepted."""
    facts = {m: _facts(src, m) for m, src in sources.items()}

    def exists(module: str, name: str | None) -> bool:
        if name is None or f"{module}.{name}" in sources:
            return module in sources
        return module in sources and name in facts[module].bound

    out = []
    for m, f in facts.items():
        out += [f"{m}: {n} is used on import but not defined" for n in sorted(f.on_import)]
        out += [f"{m}: {n} is used but not defined" for n in sorted(f.later - done.names.get(m, set()))]
        out += [f"{m}: imports {mod}{'.' + sub if sub else ''}, which is not packed" for mod, sub in f.imports
                if mod.split(".")[0] == "pgolf" and not exists(mod, sub) and not done.removed(mod, sub)]
        out += [f"{m}: {alias}.{attr} is not defined in {mod}" for alias, mod, attr in f.attributes
                if mod in sources and not exists(mod, attr) and not done.removed(mod, attr)]
    return out
