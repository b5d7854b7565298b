"""ONNX export of ParScale models (P folded into the batch axis, KV cache in and out, prefix baked in)."""
from .onnx_export import ExportError, export_onnx

__all__ = ["ExportError", "export_onnx"]
