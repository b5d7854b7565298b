"""One answer of one model, advanced one decode step at a time, and two answers taking turns.

No threads: the caller's generator (the Gradio handler) owns the answers and advances them. Each
:class:`Answer` iterates :meth:`parscale_edge.runtime.OnnxCausalLM.generate_tokens` directly; closing it
closes that generator, which drops the KV cache it holds (``present`` tensors are locals of the
decode loop). :func:`take_turns` is how two answers stream at once: it always advances the answer
that has used the least compute so far, so each model gets half of the time and a faster model
streams faster, and every step is followed by a yield (where a Stop or a closed tab arrives).

Timings count each model's own steps only (tokenizing, prefill, decode, detokenizing), never the
other model's turns: TTFT = tokenizing + prefill + first sampling (ms); tokens/s = decode steps after
the first token / their time.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class PromptTooLong(ValueError):
    """The conversation does not fit the model's context (message names both lengths)."""


@dataclass
class AnswerStats:
    """What a pane shows under its answer. ms, tokens/s, tokens (eos included when produced)."""

    P: int = 1
    prompt_tokens: int = 0
    tokens: int = 0
    ttft_ms: float | None = None
    decode_s: float = 0.0
    busy_s: float = 0.0
    kv_bytes: int = 0

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first / their decode time; None before the second token."""
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else None


class Answer:
    """One model's streamed answer to ``messages`` (chat template applied, generation prompt added).

    Args:
        runtime: an :class:`parscale_edge.runtime.OnnxCausalLM`.
        messages: ``[{"role": ..., "content": ...}, ...]``, the last one the user's new message.
        sampling: :class:`parscale_edge.runtime.SamplingConfig` (``max_new_tokens`` is capped by the context).
        parallel: P streams for this answer (one of ``runtime.parallel_choices``; None: the
            runtime's default). Answers of one runtime may use different P at the same time.
    Raises:
        PromptTooLong: the templated prompt leaves no room for one new token in the context.
        parscale_edge.runtime.RuntimeInputError: a P the runtime has no ParScale parts for.

    ``stats.kv_bytes``: the KV cache this answer holds: fused graphs preallocate 2 * layers * P *
    kv_heads * head_dim * (prefix + :func:`parscale_edge.runtime.request_capacity`) elements of the export's
    cache dtype at once; reference graphs grow it by one position per token.
    """

    def __init__(self, runtime, messages: Sequence[dict], sampling, parallel: int | None = None):
        import numpy as np

        from parscale_edge.runtime import cache_types, request_capacity
        from parscale_edge.tokenizer import StreamDecoder

        t0 = time.perf_counter()
        tok = runtime.tokenizer
        ids = tok.encode(tok.apply_chat_template(list(messages), add_generation_prompt=True))
        ctx = runtime.manifest.max_position_embeddings
        if len(ids) + 1 > ctx:
            raise PromptTooLong(f"the conversation is {len(ids)} tokens and this model's context is {ctx} tokens: "
                                "shorten the message or clear the chat")
        P = runtime.P if parallel is None else int(parallel)
        if P not in runtime.parallel_choices:
            from parscale_edge.runtime import RuntimeInputError

            raise RuntimeInputError(f"this model offers P in {runtime.parallel_choices}, not P={P}")
        self.ids = ids
        self.eos = set(runtime.manifest.eos_token_ids)
        m = runtime.manifest
        item = np.dtype(cache_types(m.cache_dtype)[1]).itemsize
        self._kv_per_slot = 2 * m.num_layers * P * m.num_key_value_heads * m.head_dim * item
        self._kv_fixed = (runtime.prefix_slots(P) + request_capacity(len(ids), sampling.max_new_tokens, ctx)
                          if runtime.fused else None)
        self._steps: Iterator = runtime.generate_tokens([ids], sampling, parallel=P)
        self._decoder = StreamDecoder(tok)
        self.text = ""
        self.done = False
        self.error: str | None = None  # set when a decode step raised (the answer then ends)
        self.stats = AnswerStats(P=P, prompt_tokens=len(ids), busy_s=time.perf_counter() - t0)
        self._update_kv()

    def _update_kv(self) -> None:
        slots = self._kv_fixed if self._kv_fixed is not None else self.stats.prompt_tokens + self.stats.tokens
        self.stats.kv_bytes = self._kv_per_slot * slots

    def step(self) -> None:
        """Run one decode step (the first call: prefill) and append its text; ``done`` at the end or
        when the step raised (``error`` then holds the message)."""
        t0 = time.perf_counter()
        first = self.stats.tokens == 0
        try:
            t = int(next(self._steps)[0])
        except StopIteration:
            t = -1
        except Exception as e:  # noqa: BLE001 - a failing model ends its own answer, not the other's
            self.error = " ".join(str(e).split())[:300] or type(e).__name__
            t = -1
        if t >= 0:
            self.stats.tokens += 1
            self._update_kv()
        if t < 0 or t in self.eos:
            self.text += self._decoder.flush()
            self.close()
        else:
            self.text += self._decoder.put(t)
        dt = time.perf_counter() - t0
        self.stats.busy_s += dt
        if first:
            self.stats.ttft_ms = self.stats.busy_s * 1e3
        else:
            self.stats.decode_s += dt

    def close(self) -> None:
        """Stop decoding and free the KV cache (closes the runtime's generator). Idempotent."""
        self.done = True
        self._steps.close()


def take_turns(answers: Sequence[Answer | None]) -> Iterator[int]:
    """Advance the unfinished answer with the least compute so far by one step, yield its index;
    repeat until all are done (None entries are skipped). The caller closes the answers in its
    ``finally`` (this generator never leaves a step half-done: it yields after each one)."""
    while True:
        live = [i for i, a in enumerate(answers) if a is not None and not a.done]
        if not live:
            return
        i = min(live, key=lambda j: answers[j].stats.busy_s)
        answers[i].step()
        yield i
