"""ParScale adapters: the P-stream parts of a model (prefixes + aggregator) without the backbone.

With a frozen backbone (stage-2 training, docs/parscale.md "Two-stage training"), everything that makes a model
ParScale with P streams lives in

* ``model.layers.{i}.self_attn.prefix_k`` / ``prefix_v``: float32 ``[P, kv_heads, n_tokens, head_dim]``
* ``model.aggregate_layer.0.weight`` ``[H, P*H]``, ``.0.bias`` ``[H]``, ``.2.weight`` ``[P, H]``, ``.2.bias`` ``[P]``

and one backbone serves several P, a few MB each. An adapter file is one safetensors file holding
exactly those tensors (float32, names as above) and this string metadata::

    format             "parscale-edge-adapter/1"
    parscale_n         P
    parscale_n_tokens  prefix length per layer and stream
    num_layers         L
    backbone_sha256    :func:`backbone_sha256` of the backbone it was trained on
    source             model name or path the backbone came from

(plus ``parscale_attn_smooth``, informative).

The prefix-tuning control (``ParScaleConfig.parscale_prefix_only``, README "Does ParScale help, or
is it prefix tuning?") is an adapter with ``parscale_n`` "1", metadata ``parscale_prefix_only`` "1",
the prefixes ``[1, kv_heads, n_tokens, head_dim]`` and no aggregator tensors (readers older than it
refuse it: they need P >= 2 or the aggregator). The format is read by other runtimes with numpy and
must not change without a new ``format`` string. Loading refuses an adapter whose backbone hash
differs from the backbone it is applied to.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import current_umask

ADAPTER_FORMAT = "parscale-edge-adapter/1"
REQUIRED_METADATA = ("format", "parscale_n", "parscale_n_tokens", "num_layers", "backbone_sha256", "source")


class AdapterError(ValueError):
    """An adapter file is unreadable, malformed, or does not fit the backbone it is applied to."""


def is_parscale_tensor(name: str) -> bool:
    """True for the state-dict names that belong to ParScale (prefixes and aggregator), not the backbone."""
    return name.endswith((".self_attn.prefix_k", ".self_attn.prefix_v")) or name.startswith("model.aggregate_layer.")


def backbone_sha256(model: torch.nn.Module) -> str:
    """Canonical sha256 of a model's backbone weights (hex, 64 characters).

    Definition (fixed; other runtimes recompute it): for every state-dict tensor that is not a
    ParScale part (:func:`is_parscale_tensor`), in sorted name order, hash the UTF-8 name bytes
    followed by the tensor's values as float32, little-endian, C-contiguous. A dense P=1 model and
    its ParScale conversion therefore share one hash; tied embeddings count once
    (``model.embed_tokens.weight``), as they are stored once.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if is_parscale_tensor(name):
            continue
        arr = state[name].detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(name.encode("utf-8"))
        h.update(np.ascontiguousarray(arr, dtype="<f4").data)
    return h.hexdigest()


def share_backbone(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Make ``dst`` use ``src``'s backbone parameters and buffers (the same tensors, no copy).

    ``dst`` may live on the meta device. ``src``'s ``requires_grad`` flags are kept (a plain
    ``load_state_dict(assign=True)`` would overwrite them with ``dst``'s, unfreezing a frozen
    backbone). Raises RuntimeError when a backbone tensor of ``dst`` is missing from ``src``."""
    backbone = {k: v for k, v in src.state_dict(keep_vars=True).items() if not is_parscale_tensor(k)}
    flags = {k: v.requires_grad for k, v in backbone.items()}
    missing, _ = dst.load_state_dict(backbone, strict=False, assign=True)
    for k, v in backbone.items():
        v.requires_grad_(flags[k])
    missing = [k for k in missing if not is_parscale_tensor(k)]
    if missing:
        raise RuntimeError(f"backbone tensors missing from the source model: {missing[:3]}")


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ParScale tensors of ``model`` as float32 CPU copies, keyed by state-dict name.

    Raises AdapterError for a dense (P=1) model, which has none."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
             for k, v in model.state_dict().items() if is_parscale_tensor(k)}
    if not state:
        raise AdapterError("the model has no ParScale tensors (P=1); there is no adapter to save")
    return state


def save_adapter(model: torch.nn.Module, path: str | os.PathLike, source: str,
                 backbone_hash: str | None = None) -> Path:
    """Write the ParScale parts of ``model`` (a :class:`parscale_edge.model.ParScaleForCausalLM`, P > 1) to
    ``path`` in the adapter format above, atomically (temporary sibling + rename).

    ``backbone_hash`` defaults to :func:`backbone_sha256` of ``model`` (pass it when already known:
    hashing 135M parameters takes about a second). A P = 1 prefix-only model writes the control's
    adapter (prefixes only, metadata ``parscale_prefix_only``). Raises AdapterError for a dense P=1 model.
    """
    from safetensors.torch import save_file

    cfg = model.config
    state = adapter_state(model)
    meta: dict[str, str] = {"format": ADAPTER_FORMAT, "parscale_n": str(cfg.parscale_n),
            "parscale_n_tokens": str(cfg.parscale_n_tokens), "num_layers": str(cfg.num_hidden_layers),
            "backbone_sha256": backbone_hash or backbone_sha256(model), "source": str(source),
            "parscale_attn_smooth": repr(float(cfg.parscale_attn_smooth))}
    if cfg.parscale_prefix_only:
        meta["parscale_prefix_only"] = "1"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates files private (0600)
    os.replace(tmp, path)
    return path


def adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The checked metadata of an adapter file, read from its header only (no tensors).

    Raises AdapterError naming the file when it is missing, not safetensors, of another format, or
    lacks a required metadata key."""
    return _read(path, tensors=False)[1]


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file, with the metadata checked for the required keys.

    Raises AdapterError naming the file when it is missing, not safetensors, of another format, or
    lacks a required metadata key / ParScale tensor names."""
    return _read(path, tensors=True)


def _read(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"adapter file {p} not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys())
            data = {k: f.get_tensor(k) for k in names} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{p}: not a readable safetensors file ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{p}: metadata format is {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}; "
                           "is this a parscale-edge adapter (written by `parscale train`)?")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise AdapterError(f"{p}: adapter metadata lacks {', '.join(missing)}")
    foreign = [k for k in names if not is_parscale_tensor(k)]
    if foreign:
        raise AdapterError(f"{p}: holds non-ParScale tensors, e.g. {foreign[:3]}; an adapter holds prefixes "
                           "and the aggregator only")
    return data, meta


def apply_adapter(lm, path: str | os.PathLike, check_hash: bool = True, backbone_hash: str | None = None):
    """Put the adapter at ``path`` on the backbone of ``lm`` (an :class:`parscale_edge.loading.LoadedModel`).

    ``lm`` may be dense (P=1) or ParScale with the adapter's P and prefix length (its ParScale parts
    are replaced). A prefix-only adapter (P = 1, ``parscale_prefix_only``) gives the prefix-tuning
    control: P = 1 with a prefix, no aggregator. The backbone is shared with ``lm``, not copied.
    The returned LoadedModel's ``notes`` (they go into an export's manifest ``extra``) name the
    adapter (and ``prefix_only`` for the control) and carry
    ``backbone_sha256``. ``backbone_hash``: :func:`backbone_sha256` of ``lm.model`` when the caller
    has it (several adapters over one backbone hash it once).

    Raises:
        AdapterError: unreadable file; backbone hash mismatch (naming both hashes); layer count,
            P, prefix length or a tensor shape that does not fit the backbone; missing tensors.
    """
    from .hub import sha256_file
    from .loading import LoadedModel
    from .model import ParScaleForCausalLM

    tensors, meta = read_adapter(path)
    src = lm.model
    cfg = src.config
    P, n, L = int(meta["parscale_n"]), int(meta["parscale_n_tokens"]), int(meta["num_layers"])
    if L != cfg.num_hidden_layers:
        raise AdapterError(f"{path}: adapter is for {L} layers, the model {lm.source} has {cfg.num_hidden_layers}")
    prefix_only = meta.get("parscale_prefix_only") == "1"
    if P < 1 or (P == 1) != prefix_only:
        raise AdapterError(f"{path}: parscale_n={P}, parscale_prefix_only={meta.get('parscale_prefix_only')!r}; "
                           "an adapter needs P >= 2, or P = 1 with parscale_prefix_only \"1\" (prefix tuning)")
    if cfg.has_prefix and (cfg.parscale_n, cfg.parscale_n_tokens, cfg.parscale_prefix_only) != (P, n, prefix_only):
        raise AdapterError(f"{path}: adapter has P={P}{' (prefix only)' * prefix_only}, {n} prefix tokens but "
                           f"{lm.source} already has P={cfg.parscale_n}{' (prefix only)' * cfg.parscale_prefix_only}, "
                           f"{cfg.parscale_n_tokens}; apply it to the dense backbone")
    digest = backbone_hash or backbone_sha256(src)
    if check_hash and digest != meta["backbone_sha256"]:
        raise AdapterError(
            f"{path} was trained on another backbone: adapter backbone_sha256 {meta['backbone_sha256']}, "
            f"{lm.source} has {digest} (source recorded in the adapter: {meta['source']}); use the adapter "
            "made for this model or train one with `parscale train`")
    smooth = float(meta.get("parscale_attn_smooth", cfg.parscale_attn_smooth if cfg.parscale_n > 1 else 0.1))
    new_cfg = cfg.with_parallel(P, n, smooth, prefix_only=prefix_only)
    dtype = next(src.parameters()).dtype
    with torch.device("meta"):
        model = ParScaleForCausalLM(new_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_parscale_tensor(k)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"{path}: tensor names do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise AdapterError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model needs {shape}")
        if not torch.isfinite(tensors[k]).all():
            raise AdapterError(f"{path}: {k} holds NaN/Inf")
    model = model.to_empty(device="cpu")
    for buf in model.buffers():
        buf.zero_()
    share_backbone(model, src)  # the backbone's own tensors, no copy
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in tensors:
                p.copy_(tensors[name])
    model = model.to(dtype).eval()
    notes = {k: v for k, v in lm.notes.items() if k not in ("converted_to_parallel", "prefix_init")}
    notes.update(adapter=str(path), adapter_sha256=sha256_file(path), backbone_sha256=digest,
                 converted_to_parallel=P)
    if prefix_only:
        notes["prefix_only"] = True
    return LoadedModel(model, lm.tokenizer, lm.source, lm.source_sha256, dict(lm.generation_config), notes)
