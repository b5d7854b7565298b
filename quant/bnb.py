"""PyTorch-side reference quantization with bitsandbytes (LLM.int8 and NF4) on our own model.

A quality reference to compare ONNX Runtime's quantization against, not a speed path: on CPU,
bitsandbytes 0.50 ran NF4 about 9x and int8 about 2.7x slower than fp32 Linear (docs/parscale.md, "bitsandbytes on CPU").
bitsandbytes is optional (``pip install "parscale-edge[bnb]"``).
"""
from __future__ import annotations

from torch import nn

MODES = ("int8", "nf4")


class BitsAndBytesUnavailable(RuntimeError):
    """bitsandbytes is missing or cannot run on this machine; the message says why."""


def check_bitsandbytes() -> str:
    """Return the bitsandbytes version, or raise BitsAndBytesUnavailable explaining why it cannot run."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as e:
        raise BitsAndBytesUnavailable(f"bitsandbytes is not installed ({e}); pip install 'parscale-edge[bnb]'") from None
    try:  # a tiny smoke test: some builds import but have no kernels for this CPU
        lin = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        lin.load_state_dict(nn.Linear(64, 64, bias=False).state_dict())
        lin(torch.randn(1, 64))
    except Exception as e:  # noqa: BLE001 - report any backend failure as "unsupported here"
        raise BitsAndBytesUnavailable(f"bitsandbytes {bnb.__version__} cannot run on this CPU: "
                                      f"{type(e).__name__}: {e}") from None
    return bnb.__version__


def quantize_linears(model: nn.Module, mode: str) -> int:
    """Replace the decoder's nn.Linear layers (attention and MLP projections) in place.

    ``int8``: ``bnb.nn.Linear8bitLt`` (LLM.int8, outlier threshold 6.0); ``nf4``:
    ``bnb.nn.Linear4bit(quant_type="nf4")`` with float32 compute. The ParScale aggregator, the
    embedding and the output head stay in float, as in our ONNX quantization. Returns how many
    layers were replaced. Raises ValueError for another mode, BitsAndBytesUnavailable without bnb.
    """
    if mode not in MODES:
        raise ValueError(f"unknown bitsandbytes mode {mode!r}; choose {', '.join(MODES)}")
    check_bitsandbytes()
    import bitsandbytes as bnb
    import torch

    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                has_bias = lin.bias is not None
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                            has_fp16_weights=False, threshold=6.0)
                else:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias,
                                          compute_dtype=torch.float32, quant_type="nf4")
                q.load_state_dict(lin.state_dict())
                setattr(parent, name, q.to("cpu"))
                count += 1
    return count
