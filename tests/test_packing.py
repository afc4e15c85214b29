import numpy as np
import pytest
from shiftadd_tvm.schedules.packing import (
    EXP_MAX,
    EXP_MIN,
    decode_terms,
    dequantize,
    encode_terms,
    pack_planes,
    unpack_planes,
)


@pytest.mark.parametrize(
    "bits,n,k,gs", [(1, 1, 8, 8), (3, 5, 72, 32), (2, 7, 200, 64), (4, 3, 576, 128)]
)
def test_planes_round_trip(bits, n, k, gs):
    rng = np.random.default_rng(k)
    codes = rng.random((bits, n, k)) < 0.5
    planes = pack_planes(codes, gs)
    kp = -(-k // gs) * gs
    assert planes.shape == (bits, n, kp // 8) and planes.dtype == np.uint8
    np.testing.assert_array_equal(unpack_planes(planes, k), codes)
    # padding columns are clear bits
    assert not np.unpackbits(planes, axis=-1, bitorder="little")[..., k:].any()


def test_bit_order_is_documented_layout():
    # column k lives in byte k // 8 at bit k % 8; a set bit means +1
    codes = np.zeros((1, 1, 16), dtype=bool)
    codes[0, 0, 3] = True
    codes[0, 0, 9] = True
    planes = pack_planes(codes, 16)
    assert planes[0, 0, 0] == 1 << 3 and planes[0, 0, 1] == 1 << 1


def test_terms_round_trip_and_range():
    signs = np.array([1, -1, 0, 1, -1])
    exps = np.array([EXP_MIN, EXP_MAX, 5, 0, -7])
    codes = encode_terms(signs, exps)
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(
        decode_terms(codes), [2.0**EXP_MIN, -(2.0**EXP_MAX), 0.0, 1.0, -(2.0**-7)]
    )
    with pytest.raises(ValueError, match="exponent"):
        encode_terms(np.array([1]), np.array([EXP_MAX + 1]))


def test_dequantize_matches_definition():
    rng = np.random.default_rng(1)
    bits, n, k, gs, t = 2, 4, 40, 16, 2
    codes = rng.random((bits, n, k)) < 0.5
    signs = rng.choice([-1, 0, 1], (bits, n, 3, t))
    exps = rng.integers(-8, 2, (bits, n, 3, t))
    w = dequantize(pack_planes(codes, gs), encode_terms(signs, exps), k, gs)
    alpha = (signs * 2.0**exps).sum(-1)
    expect = sum(
        (codes[b] * 2.0 - 1) * np.repeat(alpha[b], gs, axis=-1)[:, :k] for b in range(bits)
    )
    np.testing.assert_allclose(w, expect, rtol=0, atol=0)
