import pytest

from pgolf import provenance


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
    names = {stage: {p.name for p in provenance.module_files(stage)} for stage in provenance.STAGE_ENTRIES}
    assert {"main.py", "model.py", "muon.py", "loader.py", "shards.py", "tensorfile.py"} <= names["train"]
    assert {"evaluate.py", "bpb.py", "artifact.py", "rtn.py", "model.py"} <= names["evaluate"]
    assert "model.py" not in names["quantize"] and "muon.py" not in names["evaluate"]
    assert {"calibrate.py", "model.py", "shards.py"} <= names["calibrate"]
    assert {"gptq.py", "clip.py"} <= names["quantize"] and {"pack.py", "artifact.py"} <= names["compress"]
    with pytest.raises(KeyError, match="unknown stage"):
        provenance.code_version("nope")


def test_code_files_are_the_package_sources():
    files = provenance.code_files()
    assert all(p.suffix == ".py" for p in files)
    assert any(p.name == "provenance.py" for p in files)
