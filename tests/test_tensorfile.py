import pytest
import torch

from pgolf.formats import tensorfile


def test_round_trip_keeps_dtypes_and_meta(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.arange(6, dtype=torch.int8),
               "d": torch.randn(2).half()}
    tensorfile.save(tmp_path / "t.pgt", tensors, {"step": 3})
    back, meta = tensorfile.load(tmp_path / "t.pgt")
    assert meta == {"step": 3}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_corrupt_files_are_refused(tmp_path):
    data = tensorfile.dumps({"a": torch.randn(100)})
    with pytest.raises(tensorfile.TensorFileError, match="lies past the end"):
        tensorfile.loads(data[:-8], "t.pgt")
    with pytest.raises(tensorfile.TensorFileError, match="bad magic"):
        tensorfile.loads(b"X" + data[1:], "t.pgt")
    with pytest.raises(tensorfile.TensorFileError, match="header length"):
        tensorfile.loads(data[:30], "t.pgt")
    with pytest.raises(tensorfile.TensorFileError, match="t.pgt: file not found"):
        tensorfile.load(tmp_path / "t.pgt")
