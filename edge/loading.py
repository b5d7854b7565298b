"""Load checkpoints into :class:`parscale_edge.model.ParScaleForCausalLM` and save them in the authors' format.

Sources: a Hugging Face folder (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``; model_type ``qwen2_parscale``, ``qwen2`` or ``llama``), a GGUF
file (read and dequantized with the ``gguf`` package), or a named model of :mod:`parscale_edge.hub`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_folder
from .config import ParScaleConfig
from .hub import sha256_file
from .model import ParScaleForCausalLM


def set_torch_threads(threads: int | None) -> None:
    """PyTorch's intra-op threads: ``threads``, default 1."""
    # On small shared CPUs PyTorch with several threads was 8-10x slower than with one (docs/parscale.md, "Threads").
    torch.set_num_threads(threads or 1)


#: Short mixed prose/code text whose queries calibrate the prefix keys of a conversion.
CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and the Seine "
    "flows through it.\n\ndef fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "Q: How many legs does a spider have?\nA: A spider has eight legs.\n"
)


#: Checkpoint formats that execute code when loaded (Python pickle); parscale-edge never opens them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """Weight files are missing, unreadable, or do not match the config."""


@dataclass
class LoadedModel:
    """A model with what the exporter needs to describe it.

    ``tokenizer`` is an :class:`parscale_edge.tokenizer.Tokenizer` or None (an HF folder without
    tokenizer.json); ``source`` names where the weights came from and ``source_sha256`` hashes them.
    """

    model: ParScaleForCausalLM
    tokenizer: object | None
    source: str
    source_sha256: str
    generation_config: dict
    notes: dict = field(default_factory=dict)  # e.g. {"converted_to_parallel": 2}: goes into the manifest


# ------------------------------------------------------------------------------------ state dicts
def build_model(cfg: ParScaleConfig, state: dict[str, torch.Tensor], source: str = "checkpoint",
                dtype: torch.dtype = torch.float32) -> ParScaleForCausalLM:
    """Instantiate the model and copy ``state`` (HF tensor names) into it.

    Tied embeddings: shared only when the config says tied and the stored tensors agree; a tied
    checkpoint may store the tensor as ``model.embed_tokens.weight`` or ``lm_head.weight``.

    Raises:
        CheckpointError: missing tensors (naming them), P>1 without ``prefix_k``/``prefix_v``,
            wrong shapes, integer-typed tensors, or NaN/Inf in any tensor.
    """
    state = dict(state)
    emb, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    if cfg.tie_word_embeddings:
        if emb is None and head is not None:
            state["model.embed_tokens.weight"] = head
        elif emb is not None and head is not None and not torch.equal(emb, head):
            warnings.warn(f"{source}: config says tie_word_embeddings but lm_head.weight differs from "
                          "the embedding; keeping them untied", stacklevel=2)
            cfg.tie_word_embeddings = False
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    elif head is None and emb is not None:
        raise CheckpointError(f"{source}: config says tie_word_embeddings=false but there is no "
                              "lm_head.weight; the checkpoint is incomplete (or set tie_word_embeddings=true)")
    with torch.device("meta"):
        model = ParScaleForCausalLM(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if cfg.parscale_n > 1 and any(".prefix_" in k for k in missing):
        raise CheckpointError(
            f"{source}: parscale_n={cfg.parscale_n} but the prefix tensors "
            f"(model.layers.N.self_attn.prefix_k/prefix_v) are missing. Load it as dense (P=1) and "
            f"run `parscale convert MODEL --parallel {cfg.parscale_n}` to add initialised prefixes")
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing from the weight files, e.g. "
                              f"{missing[:4]}; the checkpoint is incomplete or not a {cfg.family} model")
    unexpected = [k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        warnings.warn(f"{source}: ignoring {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}",
                      stacklevel=2)
    model = model.to_empty(device="cpu")
    for buf in model.buffers():  # non-persistent buffers are not in the checkpoint
        buf.zero_()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config "
                                      f"implies {tuple(p.shape)}")
            if not t.is_floating_point():
                raise CheckpointError(f"{source}: tensor {name} is stored as {str(t.dtype).removeprefix('torch.')}, "
                                      "not as floating point; quantized or integer weight files are not supported "
                                      "(use the float16/bfloat16/float32 checkpoint, or a GGUF file)")
            p.copy_(t.to(p.dtype))
    if cfg.has_prefix:
        for name, p in model.named_parameters():
            if (".prefix_" in name or "aggregate_layer" in name) and not torch.isfinite(p).all():
                raise CheckpointError(
                    f"{source}: {name} holds NaN/Inf (the authors' code leaves prefixes uninitialised). "
                    "Re-create the ParScale parts with `parscale convert`")
    for name, p in model.named_parameters():  # every weight, once (a NaN norm weight gave empty answers)
        if not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN/Inf value(s) of {p.numel()}; the "
                                  "checkpoint is damaged (download it again) or was saved from a diverged run")
    return model.to(dtype).eval()


def read_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``.

    Raises CheckpointError for a missing, truncated or corrupt file (naming it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt, "
                                  "download it again") from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for ext in PICKLE_SUFFIXES for p in path.glob(f"*{ext}"))
            extra = (f" ({', '.join(pickles[:3])}: pickle-based PyTorch checkpoints are never loaded, since "
                     "unpickling runs code from the file; convert them to safetensors where you trust them, "
                     "or download the safetensors version)") if pickles else ""
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{extra}")
        files = found
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if Path(name).name != name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file name inside {path}; refusing to read it")
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path}: weight shard {name} listed in the index is missing")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e}); it is corrupt or truncated, "
                                  "download it again") from None
    if not state:
        raise CheckpointError(f"{path}: {', '.join(files)} hold(s) no tensors; the download is incomplete or a "
                              "placeholder: download the weights again")
    return state


def load_hf_folder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a Hugging Face folder (authors' ParScale format or dense Qwen2/Llama)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model folder")
    cfg = ParScaleConfig.from_json_file(cfg_path)
    state = read_safetensors_folder(path)
    model = build_model(cfg, state, source=str(path), dtype=dtype)
    tok = None
    if (path / "tokenizer.json").exists():
        from .tokenizer import Tokenizer
        tok = Tokenizer.from_dir(path)
    gen = {}
    if (path / "generation_config.json").exists():
        gen = json.loads((path / "generation_config.json").read_text())
    weights = sorted(path.glob("*.safetensors"))
    h = hashlib.sha256()
    for w in weights:
        h.update(sha256_file(w).encode())
    return LoadedModel(model, tok, str(path), h.hexdigest(), gen)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load a GGUF file (llama or qwen2), dequantized to ``dtype``, with its tokenizer."""
    from .gguf_io import read_gguf

    with warnings.catch_warnings(record=True) as caught:  # kept in the notes: a cached export says them again
        warnings.simplefilter("always")
        cfg, arrays, tok = read_gguf(path, progress=progress)  # one open: GGUF metadata parsing is slow
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    model = build_model(cfg, state, source=str(path), dtype=dtype)
    notes = {"load_warnings": [str(w.message) for w in caught]} if caught else {}
    return LoadedModel(model, tok, str(path), sha256_file(path), {}, notes)


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load a named model (``smollm2-135m``...), a ``.gguf`` file or a Hugging Face folder."""
    from .hub import fetch_gguf, resolve_model

    kind, ref = resolve_model(str(spec))
    if kind == "named":
        lm = load_gguf(fetch_gguf(ref, progress=progress), dtype=dtype, progress=progress)
        lm.source = ref
        return lm
    if kind == "gguf":
        return load_gguf(ref, dtype=dtype, progress=progress)
    return load_hf_folder(ref, dtype=dtype)


# ----------------------------------------------------------------------------------------- saving
def save_hf_folder(lm: LoadedModel, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and tokenizer files in
    the authors' format (tensor names of docs/parscale.md), atomically: a temporary sibling folder is
    renamed into place, so a failure leaves nothing half-written.

    Raises FileExistsError when ``out`` exists and ``overwrite`` is False, parscale_edge.atomic.OutputPathError
    when ``overwrite`` may not replace it (not this toolkit's folder, or it is or holds the source).
    """
    from safetensors.torch import save_file

    out = Path(out)
    cfg = lm.model.config
    if cfg.family != "qwen2" and cfg.parscale_n > 1:
        warnings.warn("the authors' ParScale format is defined for Qwen2; a Llama backbone is saved with the "
                      "same ParScale fields, which only parscale-edge reads", stacklevel=2)
    with atomic_folder(out, overwrite, sources=[lm.source]) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in lm.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = dict(lm.generation_config)
        if cfg.eos_token_id is not None:
            gen.setdefault("eos_token_id", cfg.eos_token_id)
        if cfg.bos_token_id is not None:
            gen.setdefault("bos_token_id", cfg.bos_token_id)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if lm.tokenizer is not None:
            lm.tokenizer.save(tmp)
    return out


def convert_to_parscale(lm: LoadedModel, parallel: int, n_tokens: int = 48, smooth: float = 0.1,
                        seed: int = 0, prefix_score: float = 4.0, prefix_only: bool = False) -> LoadedModel:
    """Turn a dense (P=1) model into a ParScale one with ``parallel`` streams (stage-2 start point).

    The backbone is shared (not copied); the prefixes and the aggregator get the finite
    initialisation of :meth:`ParScaleForCausalLM.init_parscale`, calibrated on the dense model's
    queries for :data:`CALIBRATION_TEXT` (random tokens when there is no tokenizer). Defaults follow the released
    checkpoints: 48 prefix tokens, smoothing 0.1 (docs/parscale.md, "Config fields").

    ``prefix_only`` with ``parallel`` = 1: the prefix-tuning control instead (one stream with a
    prefix initialised by the same rule, no aggregator; ``ParScaleConfig.parscale_prefix_only``).

    Raises ValueError if the model already has P > 1 or a prefix, or ``parallel`` < 2 without
    ``prefix_only`` (or ``prefix_only`` with ``parallel`` != 1).
    """
    src = lm.model
    if src.config.has_prefix:
        raise ValueError(f"the model already has parscale_n={src.config.parscale_n}"
                         f"{' with a prefix' * src.config.parscale_prefix_only}; convert a dense model")
    if prefix_only and parallel != 1:
        raise ValueError(f"prefix_only is the P=1 control; got parallel={parallel}")
    if parallel < 2 and not prefix_only:
        raise ValueError("--parallel must be >= 2 for a ParScale model (or 1 with a prefix only)")
    cfg = src.config.with_parallel(parallel, n_tokens, smooth, prefix_only=prefix_only)
    model = ParScaleForCausalLM(cfg).to(next(src.parameters()).dtype)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all(".prefix_" in k or "aggregate_layer" in k for k in missing), missing
    calib = None
    if lm.tokenizer is not None:
        calib = torch.tensor([lm.tokenizer.encode(CALIBRATION_TEXT)])
    model.init_parscale(dense=src, calibration_ids=calib, prefix_score=prefix_score, seed=seed)
    notes = {**lm.notes, "converted_to_parallel": parallel, "prefix_init": "init_parscale",
             "prefix_score": prefix_score, "seed": seed, **({"prefix_only": True} if prefix_only else {})}
    return LoadedModel(model.eval(), lm.tokenizer, lm.source, lm.source_sha256, dict(lm.generation_config), notes)
