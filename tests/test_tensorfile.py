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


def test_read_meta_reads_the_header_alone_and_checks_it(tmp_path):
    path = tmp_path / "h.pgt"
    tensorfile.save(path, {"w": torch.randn(64, 64)}, {"seconds": 4.5})
    assert tensorfile.read_meta(path) == {"seconds": 4.5} == tensorfile.load(path)[1]
    data = path.read_bytes()
    head = len(data) - 64 * 64 * 4
    cases = {"truncated": data[:-4], "appended": data + b"\0",
             "meta edited": data[:head].replace(b"4.5", b"0.5") + data[head:],
             "cut in the header": data[: head - 3], "cut in the prefix": data[:10]}
    for case, bad in cases.items():
        path.write_bytes(bad)
        with pytest.raises(tensorfile.TensorFileError, match="h.pgt"):
            tensorfile.read_meta(path)
            pytest.fail(case)
    with pytest.raises(tensorfile.TensorFileError, match="file not found"):
        tensorfile.read_meta(tmp_path / "none.pgt")
