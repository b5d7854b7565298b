"""ONNX export of ParScale models (P folded into the batch axis, KV cache in and out).

Two graphs over the same weights: ``fused`` (:mod:`parscale_edge.export.onnx_builder`, the default: ONNX Runtime's
fused ops, preallocated KV cache, ParScale parts as inputs) and ``reference``
(:mod:`parscale_edge.export.onnx_export`, a TorchScript trace of our PyTorch model, node for node).
A tool layer (README "Layout"): built on the torch side, writes the manifest the runtime reads.
Their inputs, outputs and cache row orders: docs/graphs.md."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from .onnx_export import ExportError, export_onnx

GRAPHS = ("auto", "fused", "reference")


def export_model(lm, out_dir: str | os.PathLike, overwrite: bool = False, graph: str = "auto", extra_parallel=(),
                 precision: str = "fp32") -> Path:
    """Export ``lm`` to ``out_dir`` as the ``graph`` kind: ``fused``, ``reference``, or ``auto``
    (fused when :func:`parscale_edge.export.onnx_builder.fused_unsupported` has no objection, else reference
    with a warning naming the reason). ``extra_parallel``: models over the same backbone with other P (fused
    only: their ParScale parts join the folder). ``precision`` fp32, fp16 or bf16 for both graphs
    (fp16/bf16 are the CUDA path: ONNX Runtime's CUDA GroupQueryAttention runs in half precision
    only; a reference fp16/bf16 export casts ``lm.model`` in place, a fused one does not).

    Raises ValueError for another graph name or precision, or ``fused`` on a config it cannot
    express; see :func:`parscale_edge.export.onnx_builder.export_fused` and :func:`parscale_edge.export.onnx_export.export_onnx`
    for the rest."""
    if graph in ("auto", "fused"):
        from .onnx_builder import export_fused, fused_unsupported

        why = fused_unsupported(lm.model.config)
        if why and graph == "auto" and not extra_parallel:
            warnings.warn(f"exporting the reference graph: {why}", stacklevel=2)
            return export_onnx(lm, out_dir, overwrite=overwrite, precision=precision)
        return export_fused(lm, out_dir, overwrite=overwrite, extra_parallel=extra_parallel, precision=precision)
    if graph == "reference":
        if extra_parallel:
            raise ValueError("several P in one folder need the fused graph (--graph fused)")
        return export_onnx(lm, out_dir, overwrite=overwrite, precision=precision)
    raise ValueError(f"unknown graph kind {graph!r}; use one of {', '.join(GRAPHS)}")


__all__ = ["ExportError", "GRAPHS", "export_model", "export_onnx"]
