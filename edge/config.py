"""Model configuration shared by the PyTorch model, the exporter and the runtime (no torch here).

One dataclass covers the Qwen2 and Llama families and ParScale (Chen et al. 2025, arXiv 2505.10475):
the differences are flags (``attention_bias``, ``tie_word_embeddings``, ``head_dim``), not classes.
Field names follow Hugging Face ``config.json`` so a config round-trips through the authors' format.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

#: model_type values we can build; anything else is refused with :class:`UnsupportedModelError`.
SUPPORTED_MODEL_TYPES = ("qwen2_parscale", "qwen2", "llama")
#: largest P (parscale_n) accepted: P multiplies the KV cache and the compute, and each stream adds a prefix
MAX_PARALLEL = 64
#: largest context accepted: RoPE tables, KV caches and masks grow with it (1M tokens is beyond every
#: released Qwen2/Llama model; 1e8 failed deep in the ONNX export)
MAX_CONTEXT = 1 << 20
#: fields that must be integers >= 1 (``head_dim`` when given)
_POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "max_position_embeddings", "parscale_n")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its settings is not supported by parscale-edge."""


@dataclass
class ParScaleConfig:
    """Hyper-parameters of a Qwen2/Llama decoder with optional ParScale streams.

    ``parscale_n`` (P) = 1 is exactly the dense model. For P > 1 every layer holds a KV prefix of
    ``parscale_n_tokens`` slots per stream, and the P final hidden states are merged by
    ``aggregate_layer`` with softmax weights smoothed by ``parscale_attn_smooth`` (docs/parscale.md,
    "Aggregation"; paper Sec. 2).

    ``parscale_prefix_only`` (only with P = 1): the prefix-tuning control of the stage-2 comparison
    (README "Does ParScale help, or is it prefix tuning?"): one stream with its own KV prefix of
    ``parscale_n_tokens`` slots per layer and no aggregator (prefix tuning, Li & Liang 2021). False
    (the default) keeps P = 1 the dense model.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2: True, Llama: False)
    family: str = "llama"  # "qwen2" or "llama": only decides the model_type written back
    parscale_n: int = 1
    parscale_n_tokens: int = 48
    parscale_attn_smooth: float = 0.01  # authors' class default; every release uses 0.1
    parscale_prefix_only: bool = False  # P=1 with a KV prefix, no aggregator (prefix-tuning control)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise UnsupportedModelError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly in config.json")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.parscale_n < 1:
            raise ValueError(f"parscale_n must be >= 1, got {self.parscale_n}")
        if self.parscale_n > 1 and self.parscale_n_tokens < 1:
            raise ValueError("a ParScale model with parscale_n > 1 needs parscale_n_tokens >= 1")
        if self.parscale_prefix_only and (self.parscale_n != 1 or self.parscale_n_tokens < 1):
            raise ValueError("parscale_prefix_only needs parscale_n = 1 and parscale_n_tokens >= 1, got "
                             f"parscale_n={self.parscale_n}, parscale_n_tokens={self.parscale_n_tokens}")

    @property
    def has_prefix(self) -> bool:
        """True when every layer holds a KV prefix: P > 1, or the P = 1 prefix-only control."""
        return self.parscale_n > 1 or self.parscale_prefix_only

    def _check_types(self) -> None:
        """Raises UnsupportedModelError naming the field for a value of the wrong type or range
        (a hand-edited config.json: "3" for 3, 0 KV heads, a negative size, a non-positive epsilon)."""
        def bad(name: str, want: str):
            v = getattr(self, name)
            raise UnsupportedModelError(f"{name} must be {want}, got {v!r}"
                                        + (f" ({type(v).__name__})" if isinstance(v, str) else ""))

        def is_int(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        for name in _POSITIVE_INT_FIELDS:
            v = getattr(self, name)
            if not (v is None and name == "head_dim") and not (is_int(v) and v >= 1):
                bad(name, "a positive integer")
        if self.max_position_embeddings > MAX_CONTEXT:
            bad("max_position_embeddings", f"at most {MAX_CONTEXT} (the context, in tokens)")
        if self.parscale_n > MAX_PARALLEL:
            bad("parscale_n", f"at most {MAX_PARALLEL}")
        if not (is_int(self.parscale_n_tokens) and self.parscale_n_tokens >= 0):
            bad("parscale_n_tokens", "an integer >= 0")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                bad(name, "a positive number")
        v = self.parscale_attn_smooth
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < 1):
            bad("parscale_attn_smooth", "a number in [0, 1)")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if self.bos_token_id is not None and not (is_int(self.bos_token_id) and self.bos_token_id >= 0):
            bad("bos_token_id", "a token id")
        e = self.eos_token_id
        if e is not None and not (is_int(e) and e >= 0) and not (
                isinstance(e, list) and all(is_int(t) and t >= 0 for t in e)):
            bad("eos_token_id", "a token id or a list of them")

    # ------------------------------------------------------------------ HF config.json round trip
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ParScaleConfig":
        """Build from a Hugging Face ``config.json`` dict (model_type qwen2_parscale, qwen2, llama).

        Raises:
            UnsupportedModelError: not an object, unknown model_type, a value of the wrong type or
                range (:meth:`_check_types`), or a setting we do not implement (rope_scaling other than
                none/default, also one without a type; sliding-window attention, MoE ...).
        """
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"the config is a JSON {type(d).__name__}, not an object")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {mt!r} (architectures {d.get('architectures')}); "
                f"parscale-edge supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise UnsupportedModelError(f"rope_scaling must be an object or null, got {rs!r}; only plain RoPE "
                                        "(rope_scaling null) is supported")
        if rs and (rs.get("rope_type") or rs.get("type")) != "default":
            # a scaling without a type (e.g. {"factor": 4}) is refused too: ignoring it would change the model
            raise UnsupportedModelError(
                f"rope_scaling {rs} is not supported; only plain RoPE (rope_scaling null) is")
        if d.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
        family = "qwen2" if mt.startswith("qwen2") else "llama"
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "family", "attention_bias"}
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        kw["attention_bias"] = bool(d.get("attention_bias", family == "qwen2"))
        if d.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(family=family, extra=extra, **kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict in the authors' format (model_type ``qwen2_parscale`` for a
        Qwen2 backbone, or the plain family name for a dense model of another family)."""
        if self.family == "qwen2":
            mt, arch = "qwen2_parscale", ["Qwen2ParScaleForCausalLM"]
        else:
            mt, arch = "llama", ["LlamaForCausalLM"]
        d: dict[str, Any] = {"architectures": arch, "model_type": mt, "hidden_act": "silu"}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "family"):
                continue
            v = getattr(self, f.name)
            if v is not None and not (f.name == "parscale_prefix_only" and not v):  # dense configs unchanged
                d[f.name] = v
        if self.family == "llama" and self.parscale_n > 1:
            # The authors' format only exists for Qwen2; we keep the same fields on a Llama backbone.
            d["architectures"] = ["LlamaParScaleForCausalLM"]
        d["rope_scaling"] = None
        d["use_sliding_window"] = False
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ParScaleConfig":
        """Read ``config.json``. Raises FileNotFoundError / UnsupportedModelError (naming the file and
        the field: not JSON, not an object, a value of the wrong type or range, an unsupported setting)."""
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{path}: {e}") from None

    @property
    def eos_ids(self) -> list[int]:
        """eos_token_id as a list (empty when unset)."""
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def with_parallel(self, p: int, n_tokens: int | None = None, smooth: float | None = None,
                      prefix_only: bool = False) -> "ParScaleConfig":
        """A copy with ``parscale_n = p`` (and optionally prefix length / smoothing); ``prefix_only``
        (p = 1 only) makes it the prefix-tuning control, else ``with_parallel(1)`` is the dense model."""
        c = dataclasses.replace(self, parscale_n=p, parscale_prefix_only=prefix_only, extra=dict(self.extra))
        if n_tokens is not None:
            c.parscale_n_tokens = n_tokens
        if smooth is not None:
            c.parscale_attn_smooth = smooth
        c.__post_init__()
        return c
