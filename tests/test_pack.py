"""Dense bit packing and the byte shuffle: exact inverses, and refusal of what does not fit."""

import pytest
import torch

from pgolf.quant.pack import PackError, pack_codes, packed_nbytes, shuffle, unpack_codes, unshuffle


@pytest.mark.parametrize("bits", [5, 6, 7, 8, 2])
def test_packing_round_trip(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for shape in ([3, 37], [1], [0, 4], [257]):
        codes = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(codes.numel(), bits)
        assert torch.equal(unpack_codes(packed, bits, shape), codes)
    extremes = torch.tensor([lo, hi, 0, -1, 1], dtype=torch.int8)
    assert torch.equal(unpack_codes(pack_codes(extremes, bits), bits, [5]), extremes)


def test_codes_that_do_not_fit_or_bytes_that_do_not_match_are_refused():
    with pytest.raises(PackError, match="do not fit in 5 bits"):
        pack_codes(torch.tensor([16], dtype=torch.int8), 5)
    with pytest.raises(PackError, match="do not hold 100 codes of 6 bits"):
        unpack_codes(torch.zeros(10, dtype=torch.uint8), 6, [10, 10])


@pytest.mark.parametrize("stride", [0, 1, 2, 3, 4])
def test_shuffle_round_trip(stride):
    for n in (0, 1, 5, 1000, 1001):
        data = bytes(torch.randint(0, 256, (n,), dtype=torch.uint8).tolist())
        assert unshuffle(shuffle(data, stride), stride) == data
    assert shuffle(b"abcdef", 2) == b"acebdf"
