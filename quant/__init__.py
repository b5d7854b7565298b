"""Weight-only quantization of exported folders (``parscale quantize``, ``export --precision int4|int8``).

:mod:`parscale_edge.quant.onnx_quant`: int4/int8 ``MatMulNBits`` (and per-tensor dynamic int8)
through ONNX Runtime's own quantizer, the accuracy_level check, the quality report, the output
folder; :mod:`parscale_edge.quant.gguf_blocks`: a GGUF's own quantized blocks copied into
MatMulNBits instead of re-rounded (Q4_1/Q4_K offsets through an exact correction);
:mod:`parscale_edge.quant.bnb`: a bitsandbytes (LLM.int8, NF4) quality reference on the PyTorch
model (bench only). Needs the ``quant`` extra (``bnb`` for the reference); imported lazily by the
CLI, the profiler and the demo. Details and measurements: docs/quantization.md.
"""
