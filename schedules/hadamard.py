"""Online Hadamard transform ``y = x blockdiag(H, ..., H)`` as one TensorIR kernel, adds and
subtracts only, with its numpy reference.

``H`` is the unnormalized Hadamard matrix of order ``block = base * P`` that ``hadamard``
builds (``hadamard`` below), ``kron(A, H_P)``: ``A`` one of the Paley orders 12 / 20 (or 1) and ``H_P`` the Sylvester
matrix of a power of two ``P``. Per row of ``x [R, N]`` (``N`` a multiple of ``block``):

* ``log2(P)`` butterfly stages on each run of ``P`` values (stage ``h``: ``(a, b) -> (a + b, a - b)``
  for the pairs ``h`` apart), ping-ponging between two row buffers;
* then, when ``base > 1``, ``y_i = sum_m +-A[m, i] z_m`` over the ``base`` runs of one block (``A[i, m]``
  when ``transpose``: ``H^T = kron(A^T, H_P)``), with the signs unrolled into adds and subtracts.

The whole row stays in a thread's (CPU) or a thread block's (CUDA, shared memory) buffers for all
stages: one read of ``x`` and one write of ``y``. The same transform imported as torch ops was
``log2(block)`` fused kernels, each a full pass over the activations.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 (Paley construction I, q prime, q = 3 mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    h = np.ones((q + 1, q + 1), np.int64)
    h[1:, 0] = -1
    h[1:, 1:] = jac + np.eye(q, dtype=np.int64)
    return h


BASES = {1: np.ones((1, 1), np.int64), 12: _paley(11), 20: _paley(19)}


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order n (entries +-1, ``H H^T = n I``) built from Sylvester doubling
    and the Paley orders 12 and 20, or None if ``n`` is not of that form."""
    if n in BASES:
        return BASES[n]
    for base in (12, 20):
        if n % base == 0 and n // base > 1:
            rest = hadamard(n // base)
            if rest is not None:
                return np.kron(BASES[base], rest)
    if n % 2 == 0:
        half = hadamard(n // 2)
        if half is not None:
            return np.kron(np.array([[1, 1], [1, -1]]), half)
    return None


HADAMARD_ATTR = "shiftadd.hadamard"  # on the PrimFunc: "rows,width,block,transpose"


def split_order(block: int) -> tuple[int, int]:
    """``block = base * P`` with ``base`` in {1, 12, 20} and ``P`` a power of two, as
    ``hadamard`` builds it (``(base, P)``); ValueError for any other order."""
    for base in (12, 20, 1):
        p = block // base
        if block % base == 0 and p >= (2 if base == 1 else 1) and p & (p - 1) == 0:
            return base, p
    raise ValueError(
        f"no online Hadamard of order {block}: use 2^a, 12 * 2^a or 20 * 2^a (a >= 1 for 2^a)"
    )


def reference(x: np.ndarray, block: int, transpose: bool = False) -> np.ndarray:
    """numpy: ``x [..., N] @ blockdiag(H^T if transpose else H)`` in float64."""
    h = hadamard(block).astype(np.float64)
    if transpose:
        h = h.T
    xs = np.asarray(x, np.float64)
    v = xs.reshape(*xs.shape[:-1], xs.shape[-1] // block, block)
    return (v @ h).reshape(xs.shape)


@dataclasses.dataclass(frozen=True)
class HadamardConfig:
    rows: int
    width: int  # N
    block: int
    transpose: bool = False

    def __post_init__(self):
        split_order(self.block)
        if self.rows < 1 or self.width < 1 or self.width % self.block:
            raise ValueError(
                f"hadamard: width {self.width} is not a positive multiple of block {self.block}"
            )

    @property
    def name(self) -> str:
        t = "_t" if self.transpose else ""
        return f"hadamard_r{self.rows}_n{self.width}_b{self.block}{t}"


def _signs(cfg: HadamardConfig) -> list[list[int]]:
    """``s[i][m]``: the sign of run ``m`` in output run ``i`` of one block."""
    base, _ = split_order(cfg.block)
    a = BASES[base]
    return [[int(a[i, m] if cfg.transpose else a[m, i]) for m in range(base)] for i in range(base)]


def _stage_plan(cfg: HadamardConfig):
    """``(stages, mix)``: butterfly half-widths with each one's source and destination names, and
    the mixing stage's source (None when base == 1)."""
    base, p = split_order(cfg.block)
    halves = []
    h = 1
    while h < p:
        halves.append(h)
        h *= 2
    stages = []
    src = "x"
    for k, h in enumerate(halves):
        last = k == len(halves) - 1
        dst = "y" if last and base == 1 else ("buf0", "buf1")[k % 2]
        stages.append((h, src, dst))
        src = dst
    return stages, (src if base > 1 else None)


def _source(cfg: HadamardConfig, cuda: bool, threads: int) -> str:
    """TVMScript text of the kernel (the stages are unrolled here, so every loop has a constant
    extent and the long butterfly strides vectorize)."""
    base, p = split_order(cfg.block)
    n, r = cfg.width, cfg.rows
    stages, mix_src = _stage_plan(cfg)
    lines = [
        "@T.prim_func(s_tir=True)",
        f"def {cfg.name}(x: T.Buffer(({r}, {n}), 'float32'), y: T.Buffer(({r}, {n}), 'float32')):",
    ]
    attrs = '"tirx.noalias": True' + (', "tirx.is_scheduled": True' if cuda else "")
    lines += [
        f"    T.func_attr({{{attrs}}})",
        "    with T.sblock('root'):",
        "        T.reads()",
        "        T.writes()",
    ]
    if cuda:
        lines.append(f"        for row in T.thread_binding({r}, thread='blockIdx.x'):")
        scope = ", scope='shared'"
    else:
        lines.append(f"        for row in T.parallel({r}):")
        scope = ""
    ind = " " * 12
    lines += [
        f"{ind}buf0 = T.sblock_alloc_buffer(({n},), 'float32'{scope})",
        f"{ind}buf1 = T.sblock_alloc_buffer(({n},), 'float32'{scope})",
    ]

    def ref(name: str, idx: str) -> str:
        return f"{name}[row, {idx}]" if name in ("x", "y") else f"{name}[{idx}]"

    def cuda_loop(total: int) -> tuple[str, str]:
        """Append a loop spreading ``total`` items over the block's threads; returns the body's
        indent and the item index expression."""
        per = -(-total // threads)
        lines.extend(
            [
                f"{ind}for tx in T.thread_binding({threads}, thread='threadIdx.x'):",
                f"{ind}    for it in range({per}):",
            ]
        )
        body = ind + " " * 8
        if per * threads != total:
            lines.append(f"{body}if it * {threads} + tx < {total}:")
            body += "    "
        return body, f"(it * {threads} + tx)"

    for h, src, dst in stages:
        if cuda:
            body, pidx = cuda_loop(n // 2)
            lo = f"{pidx} // {h} * {2 * h} + {pidx} % {h}"
        else:
            lines.append(f"{ind}for o in range({n // (2 * h)}):")
            loop = "T.vectorized" if h >= 4 else "range"
            lines.append(f"{ind}    for j in {loop}({h}):")
            body = ind + " " * 8
            lo = f"o * {2 * h} + j"
        hi = f"{lo} + {h}"
        lines += [
            f"{body}{ref(dst, lo)} = {ref(src, lo)} + {ref(src, hi)}",
            f"{body}{ref(dst, hi)} = {ref(src, lo)} - {ref(src, hi)}",
        ]
    if mix_src is not None:
        signs = _signs(cfg)
        blocks = n // cfg.block
        for i in range(base):
            if cuda:
                body, t = cuda_loop(blocks * p)
                blk, j = f"({t} // {p})", f"{t} % {p}"
            else:
                loop = "T.vectorized" if p >= 4 else "range"
                lines += [f"{ind}for blk in range({blocks}):", f"{ind}    for j in {loop}({p}):"]
                body, blk, j = ind + " " * 8, "blk", "j"
            terms = []
            for m in range(base):
                term = ref(mix_src, f"{blk} * {cfg.block} + {m * p} + {j}")
                if not terms:
                    terms.append(term if signs[i][m] > 0 else f"T.float32(0) - {term}")
                else:
                    terms.append(("+ " if signs[i][m] > 0 else "- ") + term)
            out = ref("y", f"{blk} * {cfg.block} + {i * p} + {j}")
            lines.append(f"{body}{out} = {' '.join(terms)}")
    return "\n".join(lines) + "\n"


def make_primfunc(cfg: HadamardConfig, cuda: bool = False, threads: int = 256, name: str = ""):
    """The kernel ``(x f32[R, N], y f32[R, N])`` for the CPU (rows in parallel, buffers per row)
    or CUDA (one thread block per row, ``threads`` threads, buffers in shared memory); ``name``:
    its global symbol (default ``cfg.name``)."""
    import tvm
    from tvm.script import tirx as T

    from .cpu_rules import KERNEL_ATTR

    func = tvm.script.from_source(_source(cfg, cuda, threads), extra_vars={"T": T})
    if isinstance(func, tvm.IRModule):
        func = func[cfg.name]
    return (
        func.with_attr("global_symbol", name or cfg.name)
        .with_attr("op_pattern", 8)  # opaque: never fused into its neighbours
        .with_attr(KERNEL_ATTR, 1)
        .with_attr(HADAMARD_ATTR, f"{cfg.rows},{cfg.width},{cfg.block},{int(cfg.transpose)}")
    )


def retarget(mod, cuda: bool):
    """``mod`` with every Hadamard kernel (``HADAMARD_ATTR``) rebuilt for CUDA when ``cuda`` (the
    import emits the CPU kernel; the import does not know the target)."""
    if not cuda:
        return mod
    from tvm import tirx

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        if HADAMARD_ATTR not in func.attrs:
            continue
        rows, width, block, transpose = (int(v) for v in str(func.attrs[HADAMARD_ATTR]).split(","))
        cfg = HadamardConfig(rows, width, block, bool(transpose))
        mod[gv] = make_primfunc(cfg, cuda=True, name=gv.name_hint)
    return mod
