"""Packed weight format of the LUT/shift kernels (one place, one docstring).

A reparameterized Linear ``W[N, K] ~= sum_b diag(alpha_b) B_b`` with ``B_b in {-1,+1}`` is stored as
two arrays:

``planes``: ``uint8[bits, N, Kp // 8]``
    Bit-plane ``b`` of output row ``n``; weight column ``k`` lives in byte ``k // 8`` at bit
    ``k % 8`` (little-endian bit order, ``np.packbits(..., bitorder="little")``). A set bit means
    ``+1``, a clear bit ``-1``. ``Kp = ceil(K / group_size) * group_size``; the padding columns
    ``K <= k < Kp`` hold clear bits and are multiplied by zero activations in the kernel.

``scales``: ``int8[bits, N, Kp // group_size, terms]``
    The scale ``alpha[b, n, g]`` of plane ``b``, row ``n``, column group ``g`` (columns
    ``g*group_size ... (g+1)*group_size - 1``) as a sum of ``terms`` signed powers of two. Each byte
    ``c`` is one term: ``c == 0`` is an absent term, otherwise the term is
    ``sign(c) * 2 ** (abs(c) - EXP_BIAS)`` with ``EXP_BIAS = 65``, so exponents ``-64 ... 62``.
    Applying a term is an exponent add (shift), never a multiply.

The CUDA kernel reads the same data transposed for coalescing: ``planes_to_cuda`` and
``scales_to_cuda`` below.

Storage per weight: ``bits + bits * terms * 8 / group_size`` bits.
"""

from __future__ import annotations

import numpy as np

EXP_BIAS = 65
EXP_MIN = 1 - EXP_BIAS  # -64
EXP_MAX = 127 - EXP_BIAS  # 62


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a whole number of scale groups."""
    return -(-k // group_size) * group_size


def encode_terms(signs: np.ndarray, exps: np.ndarray) -> np.ndarray:
    """Signed power-of-two terms (sign in {-1,0,1}, integer exponent) -> int8 codes."""
    signs = np.asarray(signs)
    exps = np.asarray(exps)
    if np.any((signs != 0) & ((exps < EXP_MIN) | (exps > EXP_MAX))):
        raise ValueError(f"power-of-two exponent outside [{EXP_MIN}, {EXP_MAX}]")
    mag = np.where(signs != 0, exps + EXP_BIAS, 0)
    return (np.sign(signs) * mag).astype(np.int8)


def decode_terms(codes: np.ndarray) -> np.ndarray:
    """int8 term codes -> float64 term values (0 for absent terms)."""
    c = np.asarray(codes).astype(np.int64)
    return np.where(c == 0, 0.0, np.sign(c) * np.exp2(np.abs(c) - EXP_BIAS))


def decode_scales(scales: np.ndarray) -> np.ndarray:
    """int8[bits, N, G, terms] -> float64 alpha[bits, N, G]."""
    return decode_terms(scales).sum(-1)


def pack_planes(codes: np.ndarray, group_size: int) -> np.ndarray:
    """Binary codes bool/{0,1}[bits, N, K] (True = +1) -> uint8 planes [bits, N, Kp // 8]."""
    bits, n, k = codes.shape
    kp = padded_k(k, group_size)
    full = np.zeros((bits, n, kp), dtype=bool)
    full[:, :, :k] = np.asarray(codes, dtype=bool)
    return np.packbits(full, axis=-1, bitorder="little")


def unpack_planes(planes: np.ndarray, k: int) -> np.ndarray:
    """uint8 planes [bits, N, Kp // 8] -> bool[bits, N, K] (True = +1)."""
    return np.unpackbits(planes, axis=-1, bitorder="little")[..., :k].astype(bool)


def dequantize(planes: np.ndarray, scales: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """Packed planes + scale codes -> dense float64 W[N, K] (the weights the kernel means)."""
    signs = unpack_planes(planes, k).astype(np.float64) * 2 - 1  # [bits, N, K]
    alpha = decode_scales(scales)  # [bits, N, G]
    per_col = np.repeat(alpha, group_size, axis=-1)[..., :k]
    return (signs * per_col).sum(0)


# CUDA layouts: the same bits and codes, arranged so that a warp's 32 output rows read 32
# consecutive words (schedules/lut_gemm_cuda.py)
def planes_to_cuda(planes: np.ndarray) -> np.ndarray:
    """uint8 planes [bits, N, Kp/8] (packing.py) -> uint32 [bits, Kp/32, N] (coalesced words)."""
    bits, n, kb = planes.shape
    if kb % 4:
        raise ValueError(f"Kp/8 = {kb} is not a multiple of 4: group_size must be a multiple of 32")
    words = np.ascontiguousarray(planes).view("<u4").reshape(bits, n, kb // 4)
    return np.ascontiguousarray(words.transpose(0, 2, 1)).astype(np.uint32, copy=False)


def scales_to_cuda(scales: np.ndarray) -> np.ndarray:
    """int8 scales [bits, N, G, terms] -> int8 [bits, G, terms, N]."""
    return np.ascontiguousarray(np.asarray(scales).transpose(0, 2, 3, 1))


def plane_term_counts(scales: np.ndarray) -> tuple[int, ...]:
    """int8 scales [bits, N, G, terms] -> per plane, the number of term slots any scale uses
    (the last present slot + 1; 0 for a plane whose scales are all 0)."""
    present = np.asarray(scales).reshape(scales.shape[0], -1, scales.shape[-1]) != 0
    used = present.any(1)  # [bits, terms]
    return tuple(int(np.nonzero(u)[0][-1]) + 1 if u.any() else 0 for u in used)


MULT_MAX = 255  # largest integer multiplier of the shared-exponent form (one unsigned byte)


def shared_exponent_form(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """int8 scales [bits, N, G, terms] -> ``(E int32[N, G], c int32[bits, N, G])`` with
    ``alpha[b, n, g] == c[b, n, g] * 2**E[n, g]`` exactly and ``|c| <= MULT_MAX``, or None when
    some (row, group) spans too many exponents for that. ``E`` is the group's smallest present
    term exponent (0 where no term is present), so every term is an integer multiple of ``2**E``:
    the same power-of-two terms, written as one shift of the group and integer plane weights
    (``quant.QuantConfig.scale_window`` fits scales that have this form)."""
    c = np.asarray(scales).astype(np.int64)
    e = np.abs(c) - EXP_BIAS
    present = c != 0
    big = np.iinfo(np.int64).max
    emin = np.where(present, e, big).min(axis=(0, 3))  # [N, G]
    emin = np.where(emin == big, 0, emin)
    shift = np.where(present, e - emin[None, :, :, None], 0)
    if np.any(shift >= 62):
        return None
    mult = (np.sign(c) << shift).sum(-1)  # [bits, N, G]
    if np.any(np.abs(mult) > MULT_MAX):
        return None
    return emin.astype(np.int32), mult.astype(np.int32)
