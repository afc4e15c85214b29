"""shiftadd-tvm: pretrained transformers -> multiplication-free TVM modules.

    import shiftadd_tvm
    art = shiftadd_tvm.compile(model, target="llvm", bits=3)
    art.export("model.so")
    rt = shiftadd_tvm.runtime.load("model.so")
    logits = rt(input_ids)

``shiftadd_tvm.runtime`` imports neither torch nor the TVM compiler; ``compile`` is imported lazily so
that a deployment needs only the runtime.
"""

__version__ = "0.1.0"

from . import runtime  # noqa: E402


def compile(model, target="llvm", bits=3, **kwargs):  # noqa: A001
    """See :func:`shiftadd_tvm.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(model, target=target, bits=bits, **kwargs)


__all__ = ["compile", "runtime", "__version__"]
