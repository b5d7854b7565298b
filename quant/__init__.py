"""Quantization of exported models (int8 / 4-bit through ONNX Runtime's tooling).

Not implemented yet: tracked in issue #3. Nothing here is imported by the rest of the toolkit.
"""
