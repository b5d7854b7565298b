"""Shared helpers of the reliability suite: the trained Q/A model and small runtime wrappers."""
from __future__ import annotations

import numpy as np
import torch

QA_TEXT = ("Q: What is the capital of France?\nA: The capital of France is Paris.\n"
           "Q: What is the capital of Italy?\nA: The capital of Italy is Rome.\n"
           "Q: How many legs does a spider have?\nA: A spider has eight legs.\n"
           "Q: What color is the sky?\nA: The sky is blue on a clear day.\n"
           "Q: What do bees make?\nA: Bees make honey from the nectar of flowers.\n")


def train_qa_model(steps: int = 60, seed: int = 0):
    """A P=2 model (bytes as tokens: vocab 128; hidden 128 so that block 128 divides every weight)
    trained with AdamW on :data:`QA_TEXT`. About 60 steps bring the loss below 0.1 (a few seconds)."""
    from tiny import tiny_model

    torch.manual_seed(seed)
    lm = tiny_model("qwen2", 2, tie=False, seed=seed, vocab_size=128, hidden_size=128, intermediate_size=256,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    m = lm.model.train()
    data = torch.tensor(list(QA_TEXT.encode()))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    S, B = 64, 8
    for _ in range(steps):
        starts = torch.randint(0, len(data) - S - 1, (B,), generator=g)
        x = torch.stack([data[s:s + S] for s in starts])
        y = torch.stack([data[s + 1:s + S + 1] for s in starts])
        logits, _ = m(x, torch.ones_like(x), torch.arange(S)[None].expand(B, S))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.notes["train_loss"] = loss.item()
    m.eval()
    return lm


def greedy(rt, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of one prompt through the runtime (no eos)."""
    from parscale_edge.runtime import SamplingConfig

    return rt.generate([prompt], SamplingConfig(max_new_tokens=n), eos_token_ids=[])[0]


def full_logits(rt, ids: list[int]) -> np.ndarray:
    """float32 [S, vocab]: one prefill over ``ids``."""
    return rt.score(np.array([ids], dtype=np.int64))[0]  # either graph kind
