"""Tiny random-weight models for fast tests."""
import torch

from edge.config import ParScaleConfig
from edge.loading import LoadedModel
from edge.model import ParScaleForCausalLM


def tiny_config(family="qwen2", P=1, tie=True, head_dim=16, **kw) -> ParScaleConfig:
    """head_dim 16 (!= hidden/heads = 8): ONNX Runtime's GroupQueryAttention needs a multiple of 16,
    and it exercises q/o projections that change width."""
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim, rope_theta=10000.0,
                rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=tie,
                attention_bias=family == "qwen2", family=family, parscale_n=P, parscale_n_tokens=4,
                parscale_attn_smooth=0.1, eos_token_id=3, bos_token_id=1)
    base.update(kw)
    return ParScaleConfig(**base)


def tiny_model(family="qwen2", P=1, tie=True, seed=0, **kw) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = tiny_config(family, P, tie, **kw)
    m = ParScaleForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.3 if p.dim() == 1 or "embed" in name else 1.0 / p.shape[-1] ** 0.5)
    return LoadedModel(m.eval(), None, f"tiny-{family}-p{P}", "0" * 64, {})
