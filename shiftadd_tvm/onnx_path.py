"""ONNX models in: validation, weight-matmul discovery, calibration with onnxruntime, export helper.

The ONNX path feeds the same reparameterization and Relax pass as the torch path: TVM's ONNX
frontend imports the graph with the initializers as named parameters, and every ``MatMul`` (or
``Gemm``) whose right operand is a 2-D float initializer is a candidate. Calibration runs the model
with onnxruntime on real token windows and records the input of each candidate MatMul.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from .errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

SHAPE_ONLY_OPS = {"Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast", "Flatten"}


def load_onnx(path: str | Path):
    """Read and check an ONNX file; ModelLoadError names what is wrong."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"ONNX file '{p}' not found")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"cannot read ONNX file '{p}': {e}") from e
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(
            f"'{p}' is not a readable ONNX model (truncated or corrupt: {type(e).__name__}); "
            "re-export it (`shiftadd-tvm export-onnx`)"
        ) from e
    if not model.graph.node:
        raise ModelLoadError(f"'{p}' holds no ONNX graph (truncated or corrupt); re-export it")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelLoadError(f"'{p}' fails the ONNX checker: {str(e).splitlines()[0]}") from e
    return model


def check_operators(model) -> None:
    """Raise UnsupportedModelError naming every node whose operator TVM's ONNX frontend lacks."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map())
    bad = [
        (n.name or f"#{i}", n.op_type, n.domain)
        for i, n in enumerate(model.graph.node)
        if n.domain not in ("", "ai.onnx") or n.op_type not in known
    ]
    if bad:
        listed = ", ".join(
            f"node '{name}' ({dom + '::' if dom else ''}{op})" for name, op, dom in bad[:8]
        )
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UnsupportedModelError(
            f"{len(bad)} ONNX node(s) use operators TVM cannot import: {listed}{more}. "
            "Re-export with standard ONNX operators (opset 17/18, no custom domains)."
        )


def graph_input(model, seq_len: int) -> tuple[str, list[int]]:
    """The token-id input and the static shape to compile it for."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"expected one input (token ids), found {len(inputs)}: {[i.name for i in inputs]}; "
            "export the model with input_ids as its only input"
        )
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type not in (6, 7):  # INT32, INT64
        raise UnsupportedModelError(
            f"input '{inp.name}' must be int32/int64 token ids (elem_type {tt.elem_type})"
        )
    dims = tt.shape.dim
    if len(dims) != 2:
        raise UnsupportedModelError(
            f"input '{inp.name}' must be [batch, seq], has rank {len(dims)}"
        )
    batch, seq = (d.dim_value if d.HasField("dim_value") else None for d in dims)
    if batch not in (None, 1):
        raise UnsupportedModelError(
            f"input '{inp.name}' has static batch {batch}; export with batch 1 or dynamic"
        )
    if seq is not None and seq != seq_len:
        log.info(
            "ONNX input '%s' has a static length %d: compiling for it (not %d)",
            inp.name,
            seq,
            seq_len,
        )
        seq_len = seq
    return inp.name, [1, seq_len]


@dataclasses.dataclass
class WeightMatmul:
    node: str
    weight: str  # initializer name
    w_nk: np.ndarray
    activation: str  # name of the MatMul's activation input
    head: bool  # the output head (kept dense by policy)
    stored: np.ndarray  # the initializer as stored (what the imported graph's constant holds)


def weight_matmuls(model) -> list[WeightMatmul]:
    """MatMul/Gemm nodes whose right operand is a 2-D float initializer."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    outputs = {o.name for o in model.graph.output}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}

    def reaches_output(name: str) -> bool:
        if name in outputs:
            return True
        return any(
            c.op_type in SHAPE_ONLY_OPS and reaches_output(c.output[0])
            for c in consumers.get(name, [])
        )

    # Transpose(initializer, perm=[1, 0]) feeding a MatMul is the exported nn.Linear form
    transposed = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Transpose"
        and n.input[0] in inits
        and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])
    }
    found = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        b = n.input[1]
        via_transpose = b in transposed
        name = transposed.get(b, b)
        if name not in inits:
            continue
        init = inits[name]
        if init.data_type != 1 or len(init.dims) != 2:  # FLOAT, 2-D
            continue
        w = numpy_helper.to_array(init)
        trans_b = (
            any(a.name == "transB" and a.i for a in n.attribute) if n.op_type == "Gemm" else False
        )
        w_nk = w if (trans_b != via_transpose) else w.T
        head = name in gathered or reaches_output(n.output[0])
        found.append(
            WeightMatmul(n.name or f"#{i}", name, np.ascontiguousarray(w_nk), n.input[0], head, w)
        )
    return found


def activation_stats(
    model, input_name: str, windows: np.ndarray, mats: list[WeightMatmul], progress=True, full=False
):
    """``X^T X / n`` (``full``) or its diagonal for the input of each candidate MatMul, recorded
    by running the model with onnxruntime."""
    import onnx
    import onnxruntime as ort
    import torch
    from tqdm import tqdm

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = sorted({m.activation for m in mats})
    existing = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums = {name: None for name in wanted}
    count = 0
    dtype = np.int64 if model.graph.input[0].type.tensor_type.elem_type == 7 else np.int32
    for row in tqdm(windows, desc="calibration (onnxruntime)", unit="window", disable=not progress):
        vals = sess.run(wanted, {input_name: row[None].astype(dtype)})
        for name, v in zip(wanted, vals, strict=True):
            x = np.asarray(v, np.float64).reshape(-1, v.shape[-1])
            s = x.T @ x if full else (x * x).sum(0)
            sums[name] = s if sums[name] is None else sums[name] + s
        count += row.shape[0]
    return {m.weight: torch.from_numpy(sums[m.activation] / max(count, 1)) for m in mats}


def export_onnx(model, path: str | Path, seq_len: int) -> Path:
    """Write a HF causal LM to ONNX (dynamo exporter, opset 18), input ``input_ids[1, seq_len]``."""
    import torch

    from ._files import atomic_path
    from .frontend import _LogitsOnly

    dest = Path(path)
    ids = torch.zeros((1, seq_len), dtype=torch.int64)
    with torch.no_grad():
        prog = torch.onnx.export(
            _LogitsOnly(model).eval(),
            (ids,),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamo=True,
            opset_version=18,
            verbose=False,
        )
    with atomic_path(dest) as tmp:
        prog.save(str(tmp))
    log.info("exported ONNX %s (%.1f MB)", dest, dest.stat().st_size / 1e6)
    return dest
