"""Trace our PyTorch model into one ONNX decoder graph with a KV cache.

P is folded into the batch axis: the cache tensors have P*B rows (stream-major), while
``input_ids``, ``attention_mask``, ``position_ids`` and ``logits`` have B rows. The ParScale prefix
and aggregator are initializers inside the graph, so the cache holds real tokens only.
The folder layout is documented in :mod:`parscale_edge.manifest`.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import onnx
import torch

from parscale_edge.atomic import atomic_folder
from parscale_edge.loading import LoadedModel
from parscale_edge.manifest import (CACHE_DTYPES, DATA_FILE, MANIFEST_FILE, MODEL_FILE, Manifest, graph_inputs, graph_outputs,
                                    past_names, present_names)

OPSET = 17
#: export precisions (``--precision``) -> torch dtype of the weights and the KV cache. fp16/bf16 keep
#: float32 where range or accuracy needs it (ParScaleForCausalLM.to_mixed_precision).
FLOAT_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Dummy sizes for tracing; deliberately unlike any config value so that a size accidentally baked
# into the graph shows up in the dynamic-shape tests.
_DUMMY_B, _DUMMY_S, _DUMMY_PAST = 3, 7, 5


class ExportError(RuntimeError):
    """The export could not be completed; nothing was written to the output folder."""


class _Wrapper(torch.nn.Module):
    """Flat positional signature for the exporter: (ids, mask, pos, *past) -> (logits, *present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        logits, present = self.model(input_ids, attention_mask, position_ids, tuple(past))
        return (logits, *present)


def _dummy_inputs(cfg, P: int, kv_dtype: torch.dtype = torch.float32):
    B, S, past = _DUMMY_B, _DUMMY_S, _DUMMY_PAST
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, past + S, dtype=torch.int64)
    pos = torch.arange(past, past + S).repeat(B, 1)
    kv = [torch.zeros(P * B, cfg.num_key_value_heads, past, cfg.head_dim, dtype=kv_dtype)
          for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, mask, pos, *kv)


def export_onnx(lm: LoadedModel, out_dir: str | os.PathLike, overwrite: bool = False,
                opset: int = OPSET, check: bool = True, precision: str = "fp32") -> Path:
    """Export ``lm`` to ``out_dir`` (see :mod:`parscale_edge.manifest` for the files and tensor names).

    ``precision`` fp32 (default), fp16 or bf16. fp16/bf16 cast ``lm.model`` in place with
    :meth:`~parscale_edge.model.ParScaleForCausalLM.to_mixed_precision`: half-precision weights and KV cache
    inputs/outputs (``manifest.cache_dtype``), float32 residual stream, norms, softmax, aggregator
    and ``logits``. fp32 also casts ``lm.model`` to float32 in place.

    The graph is traced with the TorchScript exporter (the dynamo exporter took minutes per model
    here, docs/parscale.md "TorchScript exporter"), re-saved with all weights in ``model.onnx.data`` (relative location), checked
    with the path-based ONNX checker, and the whole folder is renamed into place at the end.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: an unknown ``precision``.
        ExportError: tracing or checking failed (the temporary folder is removed).
    """
    if precision not in FLOAT_PRECISIONS:
        raise ValueError(f"unknown export precision {precision!r}; use {', '.join(FLOAT_PRECISIONS)} "
                         "(int4/int8: `parscale quantize` an fp32 export)")
    out = Path(out_dir)
    dtype = FLOAT_PRECISIONS[precision]
    model = lm.model.float().eval()
    if dtype != torch.float32:
        model.to_mixed_precision(dtype)
    cfg = model.config
    P, L = cfg.parscale_n, cfg.num_hidden_layers
    with atomic_folder(out, overwrite, sources=[lm.source]) as tmp:
        raw = tmp / "raw"
        raw.mkdir()
        inputs, outputs = graph_inputs("reference", L), graph_outputs(L)
        axes = {"input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"}}
        for n in past_names(L):
            axes[n] = {0: "stream_batch", 2: "past_sequence"}
        for n in present_names(L):
            axes[n] = {0: "stream_batch", 2: "total_sequence"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about python ints are expected here
            try:
                torch.onnx.export(_Wrapper(model), _dummy_inputs(cfg, P, dtype), str(raw / MODEL_FILE),
                                  input_names=inputs, output_names=outputs, dynamic_axes=axes,
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
            except Exception as e:  # noqa: BLE001 - re-raised with context
                raise ExportError(f"tracing to ONNX failed: {type(e).__name__}: {e}") from e
        proto = onnx.load(str(raw / MODEL_FILE), load_external_data=True)
        shutil.rmtree(raw)
        meta = {"parscale_n": str(P), "parscale_n_tokens": str(cfg.parscale_n_tokens),
                "num_layers": str(L), "producer": "parscale-edge", "precision": precision,
                "cache_dtype": CACHE_DTYPES[precision]}
        del proto.metadata_props[:]
        save_checked(proto, tmp, meta, check)
        del proto
        write_sidecars(lm, tmp, opset, precision)
    return out


def save_checked(proto: onnx.ModelProto, folder: Path, meta: dict[str, str], check: bool = True) -> None:
    """Add ``meta`` to the model's metadata, save it as ``model.onnx`` with every weight in
    ``model.onnx.data`` (relative location) and run the path-based ONNX checker (works above 2 GB).
    Raises ExportError when the checker rejects the graph."""
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    if check:
        try:
            onnx.checker.check_model(str(folder / MODEL_FILE))
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the exported graph fails the ONNX checker: {e}") from e


def write_sidecars(lm: LoadedModel, folder: Path, opset: int, precision: str = "fp32", graph: str = "reference",
                    parallel_options: dict[str, str | None] | None = None) -> None:
    """manifest.json, tokenizer files and generation_config.json next to the graph."""
    cfg = lm.model.config
    tok = lm.tokenizer
    eos = list(dict.fromkeys((tok.eos_token_ids if tok is not None else []) + cfg.eos_ids))
    man = Manifest(
        parscale_n=cfg.parscale_n, parscale_n_tokens=cfg.parscale_n_tokens if cfg.has_prefix else 0,
        num_layers=cfg.num_hidden_layers, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        eos_token_ids=eos, precision=precision, cache_dtype=CACHE_DTYPES[precision], source=lm.source,
        source_sha256=lm.source_sha256,
        family=cfg.family, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, opset=opset,
        graph=graph, parallel_options=parallel_options, rope_theta=cfg.rope_theta,
        bos_token_id=tok.bos_token_id if tok is not None else cfg.bos_token_id,
        pad_token_id=tok.pad_token_id if tok is not None else None,
        tokenizer_vocab_size=tok.vocab_size if tok is not None else None,
        extra={"parscale_attn_smooth": cfg.parscale_attn_smooth, "torch": torch.__version__,
               "onnx": onnx.__version__, **lm.notes})
    (folder / MANIFEST_FILE).write_text(man.to_json())
    gen = dict(lm.generation_config)
    gen["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tok is not None:
        tok.save(folder)
