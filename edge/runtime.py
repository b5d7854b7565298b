"""Run an exported ParScale model with ONNX Runtime: prefill, decode with a KV cache, sampling.

Importable without torch: needs onnxruntime, numpy and (for text) the ``tokenizers`` package.
The hot loop is :meth:`OnnxCausalLM.generate_tokens`: one prefill call, then one decode call per
new token, each feeding the previous ``present`` tensors back as ``past_key_values``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import MODEL_FILE, Manifest, ManifestError, past_names, present_names


class RuntimeInputError(ValueError):
    """Inputs that the graph cannot run on (wrong shapes, batch sizes, lengths)."""


def select_providers(device: str = "auto") -> list:
    """ONNX Runtime execution providers for ``device`` in ``auto|cpu|cuda`` (see :mod:`edge.providers`).

    ``auto`` takes CUDA only when onnxruntime-gpu lists it *and* a probe session runs on it; a
    CUDA entry comes with its options, ``("CUDAExecutionProvider", {...})``. Otherwise CPU, with
    one warning per process when CUDA was requested or listed but does not work. Raises
    ValueError for another device name.
    """
    from .providers import select

    return select(device)


@dataclass
class SamplingConfig:
    """Decoding settings. ``temperature`` 0 (or ``do_sample=False``) is greedy; ``top_k`` 0 and
    ``top_p`` 1.0 disable those filters; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row. logits: float [B, vocab] -> int64 [B]."""
    if cfg.greedy:
        return logits.argmax(-1).astype(np.int64)
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < cfg.top_p  # always keeps the top token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each int64 [B, S_max].

    position_ids = clamp(cumsum(mask) - 1, 0): real tokens keep positions 0..len-1, exactly as when
    each prompt runs alone (required for P > 1, PARSCALE.md "padding").
    Raises RuntimeInputError for an empty prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RuntimeInputError("every prompt needs at least one token")
    S = max(len(p) for p in prompts)
    ids = np.full((len(prompts), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), S), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = p
        mask[b, S - len(p):] = 1
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int64)
    return ids, mask, pos


class OnnxCausalLM:
    """An export folder loaded into an ONNX Runtime session.

    Args:
        folder: a folder written by ``parscale export`` (see :mod:`edge.manifest`).
        model_file: the graph file inside ``folder`` (another graph over the same weights, for checks).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``.
        threads: intra-op threads (None: ONNX Runtime's default, all cores).
    Raises:
        ManifestError: not an export folder, or model.onnx / its data file missing.
    """

    def __init__(self, folder: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 model_file: str = MODEL_FILE):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        path = self.folder / model_file
        if not path.exists():
            raise ManifestError(f"{self.folder}: {MODEL_FILE} is missing; re-export the model")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.providers = select_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ManifestError(f"{path}: ONNX Runtime cannot load the model ({str(e).strip()[:300]}); "
                                "the file or its model.onnx.data is missing or corrupt: re-export it") from None
        m = self.manifest
        self.P, self.L = m.parscale_n, m.num_layers
        self._past_names = past_names(self.L)
        self._present_names = present_names(self.L)
        self._outputs = ["logits", *self._present_names]
        self._tokenizer = None

    # ------------------------------------------------------------------------------ one graph call
    def empty_past(self, batch: int) -> list[np.ndarray]:
        """An empty cache for ``batch`` user rows: 2*L arrays float32 [P*batch, kv_heads, 0, head_dim]."""
        m = self.manifest
        z = np.zeros((self.P * batch, m.num_key_value_heads, 0, m.head_dim), dtype=np.float32)
        return [z] * (2 * self.L)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the graph once.

        Args:
            input_ids, position_ids: int64 [B, S]; attention_mask: int64 [B, past+S].
            past: 2*L arrays [P*B, kv_heads, past, head_dim] or None for an empty cache.
        Returns:
            logits float32 [B, S, vocab] and the present cache (2*L arrays, past+S tokens).
        Raises:
            RuntimeInputError: shapes that disagree (the message names both sizes).
        """
        B, S = input_ids.shape
        if past is None:
            past = self.empty_past(B)
        if len(past) != 2 * self.L:
            raise RuntimeInputError(f"past has {len(past)} tensors; this model needs {2 * self.L} (2 per layer)")
        rows, plen = past[0].shape[0], past[0].shape[2]
        if rows != self.P * B:
            raise RuntimeInputError(
                f"the KV cache has {rows} rows but input_ids has batch {B}: with P={self.P} streams the "
                f"cache needs P*B = {self.P * B} rows (stream-major). Use a cache from the same batch")
        if position_ids.shape != (B, S):
            raise RuntimeInputError(f"position_ids has shape {position_ids.shape}, expected {(B, S)}")
        if attention_mask.shape != (B, plen + S):
            raise RuntimeInputError(f"attention_mask has shape {attention_mask.shape}, expected (B, past+S) = "
                                    f"{(B, plen + S)}")
        feed = {"input_ids": input_ids.astype(np.int64, copy=False),
                "attention_mask": attention_mask.astype(np.int64, copy=False),
                "position_ids": position_ids.astype(np.int64, copy=False)}
        feed.update(zip(self._past_names, past))
        out = self.session.run(self._outputs, feed)
        return out[0], out[1:]

    # --------------------------------------------------------------------------------- generation
    def generate_tokens(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None,
                        eos_token_ids: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every row, one int64 [B] array per step.

        Prompts are left-padded (each row gets the tokens it would get alone). A row stops at any
        eos id (the eos token is yielded, later steps repeat -1 for it); the loop ends when every
        row stopped or after ``max_new_tokens``. Raises RuntimeInputError for an empty prompt or one
        longer than the model's context.
        """
        sampling = sampling or SamplingConfig()
        eos = np.array(sorted(set(self.manifest.eos_token_ids if eos_token_ids is None else eos_token_ids)),
                       dtype=np.int64)
        pad = self.manifest.pad_token_id
        pad = pad if pad is not None else (int(eos[0]) if eos.size else 0)
        longest = max((len(p) for p in prompts), default=0)
        ctx = self.manifest.max_position_embeddings
        if longest + 1 > ctx:
            raise RuntimeInputError(f"the prompt has {longest} tokens; the model's context is {ctx} tokens")
        ids, mask, pos = left_pad(prompts, pad)
        rng = np.random.default_rng(sampling.seed)
        B = ids.shape[0]
        done = np.zeros(B, dtype=bool)
        logits, past = self.forward(ids, mask, pos, None)
        budget = min(sampling.max_new_tokens, ctx - longest)
        for step in range(budget):
            nxt = sample_next(logits[:, -1, :], sampling, rng)
            nxt = np.where(done, -1, nxt)
            yield nxt
            done |= np.isin(nxt, eos)
            if done.all() or step == budget - 1:
                return
            feed = np.where(done, pad, nxt)[:, None].astype(np.int64)
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(feed, mask, pos, past)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None,
                 eos_token_ids: Sequence[int] | None = None) -> list[list[int]]:
        """New tokens per prompt (the eos token included when one was produced)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_tokens(prompts, sampling, eos_token_ids):
            for b, t in enumerate(step):
                if t >= 0:
                    out[b].append(int(t))
        return out

    # ------------------------------------------------------------------------------------- text
    @property
    def tokenizer(self):
        """The folder's :class:`edge.tokenizer.Tokenizer` (loaded on first use)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_dir(self.folder)
        return self._tokenizer

    def stream_text(self, prompt: str, sampling: SamplingConfig | None = None, chat: bool = False,
                    history: list[dict] | None = None) -> Iterator[str]:
        """Yield text pieces of one answer as tokens arrive (never a split multi-byte character).

        ``chat=True`` wraps ``history`` + the prompt in the model's chat template. The eos token is
        not printed."""
        from .tokenizer import StreamDecoder

        tok = self.tokenizer
        if chat:
            messages = list(history or []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = prompt
        ids = tok.encode(text)
        eos = set(self.manifest.eos_token_ids)
        dec = StreamDecoder(tok)
        for step in self.generate_tokens([ids], sampling):
            t = int(step[0])
            if t < 0 or t in eos:
                break
            piece = dec.put(t)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail
