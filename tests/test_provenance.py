import json
import subprocess
from pathlib import Path

import pytest

from pgolf.pipeline import provenance
from pgolf.pipeline.stages import BY_NAME


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "pgolf"
    (pkg / "report").mkdir(parents=True)
    (pkg / "report" / "__init__.py").write_text("")
    src = '"""doc"""\n\ndef f(x):\n    """doc"""\n    return x + 1  # comment\n'
    (pkg / "report" / "aggregate.py").write_text(src)
    monkeypatch.setattr(provenance, "PACKAGE", pkg)
    return pkg / "report" / "aggregate.py"


def test_comments_and_docstrings_do_not_change_the_version(fake_package):
    before = provenance.code_version("aggregate")
    fake_package.write_text('def f(x):\n    # another comment\n    return x + 1\n')
    assert provenance.code_version("aggregate") == before


def test_logic_changes_the_version(fake_package):
    before = provenance.code_version("aggregate")
    fake_package.write_text("def f(x):\n    return x + 2\n")
    assert provenance.code_version("aggregate") != before


def test_stage_modules_follow_imports():
    names = {stage: {str(p.relative_to(provenance.PACKAGE)) for p in provenance.module_files(stage)}
             for stage in BY_NAME}
    assert {"train/train.py", "model/gpt.py", "optim/muon.py", "train/loader.py", "formats/shards.py",
            "formats/tensorfile.py"} <= names["train"]
    assert {"eval/evaluate.py", "eval/bpb.py", "quant/artifact.py", "quant/rtn.py", "model/gpt.py"} <= names["evaluate"]
    assert "model/gpt.py" not in names["quantize"] and "optim/muon.py" not in names["evaluate"]
    assert {"quant/calibrate.py", "model/gpt.py", "formats/shards.py"} <= names["calibrate"]
    assert {"quant/gptq.py", "quant/clip.py"} <= names["quantize"]
    assert {"quant/pack.py", "quant/artifact.py"} <= names["compress"]
    # a rule's stage is its module: rule shards runs pgolf/data/shards.py, rule shard_order shard_order.py
    assert "data/shards.py" in names["shards"] and "data/shard_order.py" in names["shard_order"]
    with pytest.raises(KeyError, match="unknown stage"):
        provenance.code_version("nope")


def test_code_files_are_the_package_sources():
    files = provenance.code_files()
    assert all(p.suffix == ".py" for p in files)
    assert any(p.name == "provenance.py" for p in files)


# Syntax of every kind the package uses and some it may: classes, keyword-only and positional-only
# arguments, f-strings with nested formats, async comprehensions, match, except*, walrus.
SNIPPET = '''"""doc"""
import os
class A(B, metaclass=M):
    x: int = 1
    def f(self, a, /, b=2, *c, d, **e) -> str:
        """doc"""
        return f"{a!r:>{b}}" + 'u' if a else [i async for i in c] or (lambda: (yield))  # comment
async def g():
    with open(x) as f, ctx():
        match f:
            case [1, *rest] if (n := rest): pass
            case {"k": v}: pass
    try:
        pass
    except* ValueError as e:
        raise
    return await h(*a, **k)
'''


def test_source_hash_is_pinned():
    """The hash of a fixed source: a change here reruns every finished stage, so it must be deliberate.
    The value was checked identical under Python 3.11.7, 3.12.1 and 3.13.0 (3.12 added the AST field
    type_params, which made ast.dump-based hashes rerun finished stages on another Python)."""
    assert provenance.source_hash(SNIPPET) == "0853bb28667f438df3444c46c65a6206b43c82ceed1c3f3ec9ad2a5c2910d566"


def other_pythons() -> list[str]:
    found = []
    for root in (Path.home() / ".pyenv" / "versions").glob("3.1[2-9]*"):
        exe = root / "bin" / "python"
        if exe.is_file():
            found.append(str(exe))
    return found


@pytest.mark.skipif(not other_pythons(), reason="no other Python 3.12+ on this machine")
@pytest.mark.parametrize("python", other_pythons() or ["none"])
def test_stage_code_versions_are_the_same_on_another_python(python):
    """A cluster node with another Python must not rerun finished stages."""
    # the package's own sources on the path, not an install (the other Python has none of its dependencies)
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pgolf.pipeline import provenance as m; "
              "from pgolf.pipeline.stages import BY_NAME; "
              "print(json.dumps([m.source_hash(sys.argv[2]), {s: m.code_version(s) for s in BY_NAME}]))")
    root = str(Path(provenance.__file__).resolve().parents[2])  # the repository, above pgolf/
    out = subprocess.run([python, "-c", script, root, SNIPPET], capture_output=True, text=True, check=True)
    here = [provenance.source_hash(SNIPPET), {s: provenance.code_version(s) for s in BY_NAME}]
    assert json.loads(out.stdout) == here
