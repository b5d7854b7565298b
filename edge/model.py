"""Our own PyTorch ParScale decoder for the Qwen2 and Llama families.

Reads top to bottom like nanoGPT. The dense model is a standard pre-norm decoder (RMSNorm,
RoPE, grouped-query attention, SwiGLU MLP). ParScale (Chen et al. 2025, arXiv 2505.10475, Sec. 2;
semantics in docs/parscale.md, "The model") adds three named blocks, each marked ``# ParScale:`` below:

1. **replicate**: the B embedded rows are copied P times along the batch axis, stream-major
   (row ``p*B + b`` is stream p of sample b);
2. **prefix**: each layer holds ``prefix_k``/``prefix_v`` of shape ``[P, kv_heads, n_tokens, head_dim]``,
   raw key/value vectors placed in front of the keys of stream p (no RoPE, take no position,
   always visible, never stored in the KV cache);
3. **aggregate**: after the final RMSNorm the P hidden states of a token are merged with
   ``softmax(aggregate_layer(h interleaved))`` smoothed as ``w*(1-eps) + eps/P``, then ``lm_head``
   is applied once.

P = 1 is exactly the dense model: same state-dict keys, no extra parameters. The one exception is
the prefix-tuning control (``config.parscale_prefix_only``, README "Does ParScale help, or is it
prefix tuning?"): P = 1 with block 2 (a prefix ``[1, kv_heads, n_tokens, head_dim]`` per layer) and
without blocks 1 and 3 (one stream, nothing to merge).

The forward signature is the ONNX graph's: the KV cache is a flat tuple of tensors
``(k_0, v_0, k_1, v_1, ...)`` each ``[P*B, kv_heads, past, head_dim]`` holding real tokens only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ParScaleConfig

KVCache = tuple[torch.Tensor, ...]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``, without a graph node when it already is (a traced no-op .to() exports a Cast)."""
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as in Qwen2/Llama. x: [..., H] -> same shape.

    The output has the weight's dtype (a half-precision model keeps its residual stream in float32
    and gets half-precision activations out of every norm), or ``out_dtype`` when set (mixed
    precision, see :meth:`ParScaleForCausalLM.to_mixed_precision`: a float32 norm feeding
    half-precision matmuls)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.out_dtype or self.weight.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return _cast(self.weight * x.to(self.weight.dtype), dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions.

    Args:
        position_ids: int64 [N, S].
    Returns:
        cos, sin: float32 [N, 1, S, head_dim] (the half-split layout of HF ``rotate_half``).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [N, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, S, hd] by the tables of :func:`rope_cos_sin`; same shape and dtype as x.

    Computed in float32 also for half-precision x (ONNX Runtime's CUDA provider has no bfloat16 Neg)."""
    dtype = x.dtype
    if dtype != torch.float32:  # (a no-op .float() would still add a Cast to the fp32 graph)
        x = x.float()
    h = x.shape[-1] // 2
    rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return (x * cos + rotated * sin).to(dtype)


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """Each KV head serves ``rep`` query heads: [N, kv, T, hd] -> [N, kv*rep, T, hd] (repeat_interleave
    on dim 1). bfloat16 uses expand + reshape, which exports as Expand: ONNX Runtime's CUDA provider
    has no bfloat16 Tile (the fp32/fp16 graphs keep the shorter Tile form)."""
    if x.dtype != torch.bfloat16:
        return x.repeat_interleave(rep, dim=1)
    N, kv, T, hd = x.shape
    return x[:, :, None].expand(N, kv, rep, T, hd).reshape(N, kv * rep, T, hd)


class Attention(nn.Module):
    """Grouped-query self-attention with an optional per-stream KV prefix (ParScale)."""

    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, H, bias=False)
        self.P = cfg.parscale_n
        self.has_prefix = cfg.has_prefix
        if self.has_prefix:
            # ParScale: prefix. Initialised by ParScaleForCausalLM.init_parscale (never left empty).
            shape = (self.P, self.n_kv, cfg.parscale_n_tokens, self.hd)
            self.prefix_k = nn.Parameter(torch.zeros(shape))
            self.prefix_v = nn.Parameter(torch.zeros(shape))

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x: [P*B, S, H]; cos/sin: [P*B, 1, S, hd]; mask: additive float [P*B, 1, S, n_prefix+past+S];
        past_k/past_v: [P*B, kv, past, hd]. Returns (out [P*B, S, H], k, v) with k/v [P*B, kv, past+S, hd]."""
        N, S, _ = x.shape
        q = self.q_proj(x).view(N, S, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(N, S, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(N, S, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # present: real tokens only
        v = torch.cat([past_v, v], dim=2)
        keys, values = k, v
        if self.has_prefix:
            # ParScale: prefix. Stream p's prefix goes in front of rows p*B .. p*B+B-1 (stream-major).
            B = N // self.P
            pk = self.prefix_k.to(k.dtype)[:, None].expand(-1, B, -1, -1, -1).reshape(N, self.n_kv, -1, self.hd)
            pv = self.prefix_v.to(v.dtype)[:, None].expand(-1, B, -1, -1, -1).reshape(N, self.n_kv, -1, self.hd)
            keys = torch.cat([pk, keys], dim=2)
            values = torch.cat([pv, values], dim=2)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            keys, values = repeat_kv(keys, rep), repeat_kv(values, rep)
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(self.hd) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(N, S, self.n_heads * self.hd)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + _cast(a, x.dtype)  # residual adds in the residual stream's dtype (float32 when mixed)
        x = x + _cast(self.mlp(self.post_attention_layernorm(x)), x.dtype)
        return x, k, v


class Backbone(nn.Module):
    """Holds the HF ``model.*`` tensors: embed_tokens, layers, norm and (P>1) aggregate_layer."""

    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.parscale_n > 1:
            P, H = cfg.parscale_n, cfg.hidden_size
            # ParScale: aggregate. Names model.aggregate_layer.0/.2 as in the authors' checkpoints.
            self.aggregate_layer = nn.Sequential(nn.Linear(P * H, H), nn.SiLU(), nn.Linear(H, P))


class ParScaleForCausalLM(nn.Module):
    """Qwen2/Llama causal LM with P parallel streams (P=1: the dense model).

    State-dict keys are those of the Hugging Face / authors' checkpoints (``model.layers.{i}...``,
    ``model.aggregate_layer.{0,2}.*``, ``lm_head.weight`` when untied).
    """

    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        else:
            self.register_buffer("lm_head_zero_bias", torch.zeros(cfg.vocab_size), persistent=False)
        # None: the residual stream has the weights' dtype. float32 after to_mixed_precision().
        self.residual_dtype: torch.dtype | None = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, H]: the embedding itself when tied (one tensor, never a copy)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: KVCache = (),
    ) -> tuple[torch.Tensor, KVCache]:
        """One prefill or decode step.

        Args:
            input_ids: int64 [B, S].
            attention_mask: int64 [B, past+S], 1 = real token, 0 = padding (HF convention).
            position_ids: int64 [B, S]; for left padding pass ``clamp(cumsum(mask)-1, 0)``.
            past_key_values: ``(k_0, v_0, ..., k_{L-1}, v_{L-1})`` each [P*B, kv_heads, past, head_dim]
                (real tokens only, stream-major rows), or ``()`` for an empty cache.
        Returns:
            logits float [B, S, vocab] and the present cache (same layout, past+S tokens).
        """
        logits, present, _ = self._forward(input_ids, attention_mask, position_ids, past_key_values)
        return logits, present

    def aggregation_weights(self, input_ids, attention_mask, position_ids, past_key_values: KVCache = ()):
        """ParScale stream weights after smoothing: float32 [B, S, P] (all ones for P=1)."""
        _, _, w = self._forward(input_ids, attention_mask, position_ids, past_key_values)
        return w

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values):
        cfg, P = self.config, self.config.parscale_n
        B, S = input_ids.shape
        L = cfg.num_hidden_layers
        x = self.model.embed_tokens(input_ids)  # [B, S, H]: one lookup for all streams
        kv_dtype = x.dtype  # the cache has the weights' dtype, also when the residual stream is float32
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        elif x.dtype in (torch.float16, torch.bfloat16):
            # Plain half-precision weights: the residual stream, the norms' statistics, the attention
            # mask and softmax, and the aggregator stay float32 (Qwen2-family models carry
            # activations beyond fp16's 65504 in a few channels); matmuls run in the weights' dtype.
            x = x.float()

        # ParScale: replicate. Stream-major copies: row p*B + b.
        if P > 1:
            x = x.repeat(P, 1, 1)
            position_ids = position_ids.repeat(P, 1)
            attention_mask = attention_mask.repeat(P, 1)
        N = x.shape[0]
        if len(past_key_values) == 0:
            empty = x.new_zeros((N, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=kv_dtype)
            past_key_values = (empty,) * (2 * L)
        past = past_key_values[0].shape[2]

        # Additive mask [N, 1, S, n_prefix + past + S]: causal over real tokens, padding hidden,
        # prefix columns always visible (also for padded query rows and during decode).
        neg = torch.finfo(x.dtype).min
        T = attention_mask.shape[1]
        q_pos = torch.arange(S, device=x.device)[:, None] + (T - S)  # absolute cache index of queries
        k_pos = torch.arange(T, device=x.device)[None, :]
        allowed = (k_pos <= q_pos)[None] & attention_mask[:, None, :].bool()  # [N, S, T]
        if cfg.has_prefix:
            prefix_cols = torch.ones((N, S, cfg.parscale_n_tokens), dtype=torch.bool, device=x.device)
            allowed = torch.cat([prefix_cols, allowed], dim=2)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, neg)[:, None]
        del past  # positions come from position_ids, never from the cache length

        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        present = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, cos, sin, mask, past_key_values[2 * i], past_key_values[2 * i + 1])
            present += [k, v]
        x = self.model.norm(x)  # [P*B, S, H]

        if P > 1:
            # ParScale: aggregate. Interleaved features (p b) s h -> b s (h p): index h*P + p.
            H = cfg.hidden_size
            hs = x.view(P, B, S, H)
            feats = hs.permute(1, 2, 3, 0).reshape(B, S, H * P)
            agg = self.model.aggregate_layer
            w = torch.softmax(agg(_cast(feats, agg[0].weight.dtype)).float(), dim=-1)  # [B, S, P]
            eps = cfg.parscale_attn_smooth
            w = w * (1.0 - eps) + eps / P
            x = (hs.float() * w.permute(2, 0, 1)[..., None]).sum(0).to(x.dtype)  # [B, S, H]
        else:
            w = torch.ones((B, S, 1), dtype=torch.float32, device=x.device)
        # Tied: a 2-D input and a (zero) bias make the ONNX exporter emit Gemm(transB=1) on the
        # embedding itself, instead of a transposed copy of it (docs/parscale.md, "Tied embeddings in ONNX": stored twice otherwise).
        bias = self.lm_head_zero_bias if cfg.tie_word_embeddings else None
        head = self.lm_head_weight
        logits = F.linear(_cast(x.reshape(-1, cfg.hidden_size), head.dtype), head, bias).view(B, S, -1)
        if self.residual_dtype is not None:
            logits = logits.float()  # mixed precision: float32 logits (the ONNX graph's output dtype)
        return logits, tuple(present), w

    # -------------------------------------------------------------------------------- precision
    def to_mixed_precision(self, dtype: torch.dtype) -> "ParScaleForCausalLM":
        """Half-precision weights with float32 kept where range or accuracy needs it (in place).

        For fp16/bf16 exports (``export_onnx(precision=...)``): embedding, projections, ``lm_head``
        and the ParScale prefixes become ``dtype``, so do the KV cache tensors. Kept in float32:
        the residual stream and its adds (a bf16-trained Qwen2 model's residual can exceed fp16's
        65504), every RMSNorm (its weight too; it casts its output to ``dtype`` for the next
        matmul), the attention scores from the mask add through the softmax, the final norm, the
        ParScale aggregator (weights, softmax and weighted sum) and the returned logits.

        Args:
            dtype: ``torch.float16`` or ``torch.bfloat16``.
        Raises:
            ValueError: another dtype.
        """
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"mixed precision is float16 or bfloat16, got {dtype}")
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.float()
                m.out_dtype = dtype
        self.model.norm.out_dtype = torch.float32  # the aggregator (or the head's input cast) follows
        if self.config.parscale_n > 1:
            self.model.aggregate_layer.float()
        self.residual_dtype = torch.float32
        return self

    # ------------------------------------------------------------------------------- ParScale init
    @torch.no_grad()
    def init_parscale(self, dense: "ParScaleForCausalLM | None" = None, calibration_ids: torch.Tensor | None = None,
                      prefix_score: float = 4.0, noise: float = 0.02, seed: int = 0) -> None:
        """Give the ParScale parts a finite, documented initialisation (the authors use torch.empty).

        Goal: before training the converted model stays close to its dense parent, yet every stream
        differs and every new parameter receives gradient.

        * ``prefix_k``: per layer and KV head, the direction ``d`` of the mean RoPE-rotated query of
          that head group, measured by running ``dense`` (the P=1 parent with the same backbone;
          default: a copy of this backbone) on ``calibration_ids`` (int64 [1, S]; default: 256
          seeded random tokens). The key is ``-a * d`` with ``a`` chosen so that the mean attention
          score ``q.k / sqrt(head_dim)`` is ``-prefix_score``: prefix slots start with little
          attention mass. Plus Gaussian noise (std ``noise`` times the key's RMS), so every slot and
          stream differs.
          The P = 1 prefix-only control (``parscale_prefix_only``) gets its one stream by the same rule.
        * ``prefix_v``: Gaussian noise with std ``noise`` times the RMS of the layer's real values.
        * ``aggregate_layer``: first Linear default init scaled by 0.01, second Linear zero: the
          stream weights start exactly uniform (1/P).

        Raises ValueError for a dense P = 1 model (nothing to initialise).
        """
        cfg = self.config
        if not cfg.has_prefix:
            raise ValueError("init_parscale needs parscale_n > 1 or parscale_prefix_only")
        g = torch.Generator().manual_seed(seed)
        P, n, kv, hd, nh = (cfg.parscale_n, cfg.parscale_n_tokens, cfg.num_key_value_heads, cfg.head_dim,
                            cfg.num_attention_heads)
        if dense is None:
            dense = ParScaleForCausalLM(cfg.with_parallel(1)).to(self.lm_head_weight.dtype)
            dense.load_state_dict(self.state_dict(), strict=False)
        if calibration_ids is None:
            calibration_ids = torch.randint(0, cfg.vocab_size, (1, 256), generator=g)
        S = calibration_ids.shape[1]
        captured: dict[tuple[int, str], torch.Tensor] = {}
        hooks = [getattr(layer.self_attn, f"{w}_proj").register_forward_hook(
                     lambda m, a, o, key=(i, w): captured.__setitem__(key, o.float()))
                 for i, layer in enumerate(dense.model.layers) for w in ("q", "v")]
        try:
            dense(calibration_ids, torch.ones_like(calibration_ids), torch.arange(S)[None])
        finally:
            for h in hooks:
                h.remove()
        cos, sin = rope_cos_sin(torch.arange(S)[None], hd, cfg.rope_theta)
        rep = nh // kv
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            q = apply_rope(captured[i, "q"].view(1, S, nh, hd).transpose(1, 2), cos, sin)[0]  # [nh, S, hd]
            qg = q.reshape(kv, rep * S, hd)
            d = qg.mean(1)
            d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # [kv, hd]
            proj = (qg * d[:, None]).sum(-1).mean(1).clamp(min=1e-3)  # mean q.d per KV group [kv]
            k = -(prefix_score * math.sqrt(hd) / proj)[:, None] * d  # [kv, hd]
            k_rms = k.pow(2).mean().sqrt()
            keys = k[None, :, None, :].expand(P, kv, n, hd) + torch.randn((P, kv, n, hd), generator=g) * noise * k_rms
            v_rms = captured[i, "v"].pow(2).mean().sqrt()
            values = torch.randn((P, kv, n, hd), generator=g) * noise * v_rms
            att.prefix_k.copy_(keys.to(att.prefix_k.dtype))
            att.prefix_v.copy_(values.to(att.prefix_v.dtype))
        if cfg.parscale_n == 1:
            return  # prefix-only control: no aggregator
        agg = self.model.aggregate_layer
        nn.init.kaiming_uniform_(agg[0].weight, a=math.sqrt(5), generator=g)
        agg[0].weight.mul_(0.01)
        agg[0].bias.zero_()
        agg[2].weight.zero_()
        agg[2].bias.zero_()
