"""Tiny random-weight models for fast tests."""
import torch

from parscale_edge.config import ParScaleConfig
from parscale_edge.loading import LoadedModel
from parscale_edge.model import ParScaleForCausalLM


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


def massive_activation_model() -> LoadedModel:
    """A tiny Qwen2 whose weights are bf16 values and whose residual stream reaches ~9e4 in one
    channel after two layers (beyond fp16's 65504), as massive activations do in bf16-trained Qwen2
    models: the embedding puts 3e4 in channel 0 and each layer's MLP adds another 3e4 there."""
    lm = tiny_model("qwen2", P=2, tie=False, max_position_embeddings=1024)
    lm.model.init_parscale()
    m, c, j = lm.model, 0, 0
    with torch.no_grad():
        m.model.embed_tokens.weight[:, c] = 3.0e4
        for layer in m.model.layers:
            layer.post_attention_layernorm.weight[c] = 1.0
            mlp = layer.mlp
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                w[j].zero_()
                w[j, c] = 1.0
            mlp.down_proj.weight[c].zero_()
            mlp.down_proj.weight[c, j] = 3.0e4 / 48  # silu(~6.9) * 6.9 ~ 48: adds ~3e4 per layer
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # bf16-trained weights
    return lm
