"""Load-time checks of an export folder, before ONNX Runtime touches it (no torch, no onnx here).

A folder can be damaged in ways ONNX Runtime reports badly or not at all: a ``model.onnx`` or
``model.onnx.data`` cut short by an interrupted copy, a ``manifest.json`` from another export (P,
layers or shapes that disagree with the graph), a ``tokenizer.json`` from another model, weights
larger than the memory left. :func:`check_export_folder` finds these and raises
:class:`ExportFolderError` with one line that names the file and the fix.

The graph is read with a small reader of the protobuf wire format (:func:`read_graph_summary`):
only the fields named in onnx.proto that the checks need (graph inputs, initializer shapes and
external-data references, metadata), so that the runtime needs neither the ``onnx`` package nor
the weights in memory. Reading the 0.8 MB graph of a 0.5B model takes milliseconds.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import MANIFEST_FILE, MODEL_FILE, REEXPORT_HINT as _REEXPORT, ExportFolderError, Manifest, ManifestError

#: Peak resident memory while ONNX Runtime creates a CPU session, as a multiple of the weight file
#: (measured 1.26x on smollm2-135m fp32: the mapped file plus MLAS's pre-packed copies).
LOAD_MEMORY_FACTOR = 1.3
#: Set to 1 to skip the free-memory check (e.g. where /proc/meminfo under-reports).
SKIP_MEMORY_CHECK_ENV = "PARSCALE_EDGE_SKIP_MEMORY_CHECK"


# ------------------------------------------------------------------------ protobuf wire format
class _Truncated(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise _Truncated("the data ends inside a number")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _fields(buf: memoryview):
    """Yield ``(field_number, wire_type, value)``: value is an int (varint, fixed) or a memoryview
    (length-delimited). Raises _Truncated when a field runs past the end of ``buf``."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise _Truncated(f"field {num} needs {ln} bytes, {n - i} are left")
            val, i = buf[i:i + ln], i + ln
        elif wt in (1, 5):
            w = 8 if wt == 1 else 4
            if i + w > n:
                raise _Truncated(f"field {num} is cut short")
            val, i = int.from_bytes(buf[i:i + w], "little"), i + w
        else:
            raise ValueError(f"unsupported protobuf wire type {wt} (field {num})")
        yield num, wt, val


def _text(v: memoryview) -> str:
    return bytes(v).decode("utf-8", errors="replace")


def _packed_ints(wt: int, v) -> list[int]:
    if wt == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x - (1 << 64) if x >= 1 << 63 else x)
    return out


@dataclass
class ExternalRef:
    """One initializer stored outside the graph file: ``length`` bytes at ``offset`` of ``location``."""

    tensor: str
    location: str
    offset: int
    length: int | None


@dataclass
class GraphSummary:
    """What the checks need from a ``model.onnx`` (field numbers of onnx.proto in brackets).

    Attributes:
        metadata: ModelProto.metadata_props [14], e.g. ``{"parscale_n": "2", "num_layers": "30"}``.
        inputs / outputs: GraphProto.input [11] / output [12]: name -> dims, each an int (fixed),
            a str (named dynamic axis) or None (unknown).
        initializers: GraphProto.initializer [5]: name -> dims (TensorProto.dims [1]).
        external: initializers with data_location EXTERNAL [14] and their external_data [13].
        consumers: GraphProto.node [1]: value name -> op types of the nodes reading it
            (NodeProto.input [1], op_type [4]).
    """

    metadata: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[int | str | None]] = field(default_factory=dict)
    outputs: dict[str, list[int | str | None]] = field(default_factory=dict)
    initializers: dict[str, list[int]] = field(default_factory=dict)
    external: list[ExternalRef] = field(default_factory=list)
    consumers: dict[str, set[str]] = field(default_factory=dict)


def _value_info(buf: memoryview) -> tuple[str, list[int | str | None]]:
    name, dims = "", []
    for num, _, v in _fields(buf):
        if num == 1:  # ValueInfoProto.name
            name = _text(v)
        elif num == 2:  # .type -> TypeProto.tensor_type [1] -> .shape [2] -> TensorShapeProto.dim [1]
            for tnum, _, tv in _fields(v):
                if tnum != 1:
                    continue
                for snum, _, sv in _fields(tv):
                    if snum != 2:
                        continue
                    for dnum, _, dv in _fields(sv):
                        if dnum != 1:
                            continue
                        d: int | str | None = None
                        for k, _, x in _fields(dv):
                            d = x if k == 1 else _text(x) if k == 2 else d
                        dims.append(d)
    return name, dims


def _initializer(buf: memoryview, out: GraphSummary) -> None:
    name, dims, location, ext = "", [], 0, {}
    for num, wt, v in _fields(buf):
        if num == 1:  # TensorProto.dims
            dims += _packed_ints(wt, v)
        elif num == 8:  # .name
            name = _text(v)
        elif num == 13:  # .external_data: StringStringEntryProto key [1] / value [2]
            kv = {k: _text(x) for k, _, x in _fields(v)}
            ext[kv.get(1, "")] = kv.get(2, "")
        elif num == 14:  # .data_location: 1 = EXTERNAL
            location = v
    out.initializers[name] = dims
    if location == 1:
        length = ext.get("length")
        out.external.append(ExternalRef(name, ext.get("location", ""), int(ext.get("offset", 0) or 0),
                                        int(length) if length else None))


def read_graph_summary(path: str | os.PathLike) -> GraphSummary:
    """Read inputs, outputs, initializer shapes, external-data references and metadata of an ONNX file.

    Reads only ``path`` (never the external data). Raises ExportFolderError naming the file when it
    is truncated or not an ONNX model."""
    p = Path(path)
    try:
        buf = memoryview(p.read_bytes())
        out = GraphSummary()
        seen_graph = False
        for num, _, v in _fields(buf):
            if num == 7:  # ModelProto.graph
                seen_graph = True
                for gnum, _, gv in _fields(v):
                    if gnum == 1:  # NodeProto
                        ins, op = [], ""
                        for nnum, _, nv in _fields(gv):
                            if nnum == 1:
                                ins.append(_text(nv))
                            elif nnum == 4:
                                op = _text(nv)
                        for i in ins:
                            out.consumers.setdefault(i, set()).add(op)
                    elif gnum == 5:
                        _initializer(gv, out)
                    elif gnum in (11, 12):
                        name, dims = _value_info(gv)
                        (out.inputs if gnum == 11 else out.outputs)[name] = dims
            elif num == 14:  # ModelProto.metadata_props
                kv = {k: _text(x) for k, _, x in _fields(v)}
                out.metadata[kv.get(1, "")] = kv.get(2, "")
        if not seen_graph or not out.inputs:
            raise ValueError("it holds no graph")
    except (ValueError, TypeError, IndexError) as e:
        what = "is truncated" if isinstance(e, _Truncated) else f"is not a readable ONNX model ({e})"
        raise ExportFolderError(f"{p} {what}: an interrupted copy or download? Copy the folder again "
                                f"or {_REEXPORT}") from None
    return out


# ---------------------------------------------------------------------------------------- checks
def _check_external(folder: Path, model_file: str, g: GraphSummary) -> int:
    """Every external reference stays inside ``folder`` and lies inside its file; returns the bytes."""
    sizes: dict[str, int] = {}
    need: dict[str, tuple[int, str]] = {}
    for ref in g.external:
        loc = ref.location
        parts = Path(loc).parts
        if not loc or Path(loc).is_absolute() or ".." in parts or loc.startswith(("/", "\\")):
            raise ExportFolderError(
                f"{folder / model_file}: tensor {ref.tensor!r} points to external data at {loc!r}, outside the "
                f"model folder; refusing to read it. Only relative files inside the folder are allowed: {_REEXPORT}")
        if loc not in sizes:
            f = folder / loc
            if not f.is_file():
                raise ExportFolderError(f"{f} is missing ({model_file} keeps its weights there): copy the whole "
                                        f"folder again or {_REEXPORT}")
            real = f.resolve()
            if folder.resolve() not in real.parents:  # ONNX Runtime refuses data that escapes the folder
                raise ExportFolderError(f"{f} is a link to {real}, outside the model folder; ONNX Runtime reads "
                                        "external data only from inside the folder: copy the file in instead of "
                                        f"linking it (e.g. cp --remove-destination {real} {f})")
            sizes[loc] = f.stat().st_size
        end = ref.offset + (ref.length or 0)
        if end > need.get(loc, (0, ""))[0]:
            need[loc] = (end, ref.tensor)
    for loc, (end, tensor) in need.items():
        if sizes[loc] < end:
            raise ExportFolderError(
                f"{folder / loc} is truncated: it has {sizes[loc]} bytes but {model_file} needs {end} "
                f"(tensor {tensor!r}); an interrupted copy or download? Copy it again or {_REEXPORT}")
    return sum(sizes.values())


def _check_graph_matches_manifest(folder: Path, model_file: str, g: GraphSummary, m: Manifest) -> None:
    """P, cache dtype, graph kind, layers, KV heads, head_dim and vocabulary of the manifest agree with the graph."""
    def fail(what: str, man_value, graph_value, where: str) -> None:
        raise ExportFolderError(
            f"{folder / MANIFEST_FILE} does not belong to {folder / model_file}: the manifest says {what} "
            f"{man_value}, the graph has {graph_value} ({where}). Restore the manifest.json written with this "
            f"model, or {_REEXPORT}")

    meta = g.metadata
    if meta.get("parscale_n", "").isdigit() and int(meta["parscale_n"]) != m.parscale_n:
        fail("P =", m.parscale_n, int(meta["parscale_n"]), "metadata parscale_n")
    if meta.get("producer") == "parscale-edge":  # reference graphs carry no "graph" key
        meta = {"graph": "reference", **meta}
    for key, value in (("cache_dtype", m.cache_dtype), ("graph", m.graph)):
        if key in meta and meta[key] != value:
            fail(f"{key} =", value, meta[key], f"metadata {key}")
    past = [n for n in g.inputs if n.startswith("past_key_values.")]
    if len(past) != 2 * m.num_layers:
        fail("num_layers =", m.num_layers, len(past) // 2, f"{len(past)} past_key_values inputs")
    for name in past:
        dims = g.inputs[name]
        if len(dims) != 4:
            fail("a 4-D cache", "[P*B, kv_heads, past, head_dim]", dims, name)
        kv, hd = dims[1], dims[3]
        if isinstance(kv, int) and kv != m.num_key_value_heads:
            fail("num_key_value_heads =", m.num_key_value_heads, kv, f"{name} dim 1")
        if isinstance(hd, int) and hd != m.head_dim:
            fail("head_dim =", m.head_dim, hd, f"{name} dim 3")
    for name, dims in g.initializers.items():
        if name.endswith("embed_tokens.weight") and len(dims) == 2 and dims[1] == m.hidden_size:
            if dims[0] != m.vocab_size:
                fail("vocab_size =", m.vocab_size, dims[0], f"initializer {name}")


def available_memory_bytes() -> int | None:
    """MemAvailable + SwapFree from /proc/meminfo (bytes), None where that file does not exist."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _check_memory(folder: Path, weight_bytes: int) -> None:
    """Refuse to load weights larger than the free memory (the kernel would kill the process)."""
    if os.environ.get(SKIP_MEMORY_CHECK_ENV) == "1" or weight_bytes == 0:
        return
    free = available_memory_bytes()
    if free is None:
        return
    need = LOAD_MEMORY_FACTOR * weight_bytes
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    if weight_bytes > free:
        raise ExportFolderError(
            f"{folder}: loading needs about {mib(need)} ({LOAD_MEMORY_FACTOR}x its {mib(weight_bytes)} of weights) "
            f"but only {mib(free)} of memory is available; close other programs, or quantize it "
            f"(`parscale quantize {folder} -o OUT --precision int4`). Set {SKIP_MEMORY_CHECK_ENV}=1 to try anyway")
    if need > free:
        warnings.warn(f"{folder}: loading may need about {mib(need)} and {mib(free)} is available; "
                      "the process may run out of memory", stacklevel=3)


def check_kv_memory(nbytes: int, what: str, fix: str) -> None:
    """Raise ExportFolderError before allocating a KV cache of ``nbytes`` that does not fit in the
    available memory (``what`` describes its shape, ``fix`` how to ask for less);
    :data:`SKIP_MEMORY_CHECK_ENV` = 1 skips the check."""
    if os.environ.get(SKIP_MEMORY_CHECK_ENV) == "1":
        return
    free = available_memory_bytes()
    if free is not None and nbytes > free:
        raise MemoryCheckError(f"the KV cache of this request needs {nbytes / 2**20:,.0f} MiB ({what}) but only "
                               f"{free / 2**20:,.0f} MiB of memory is available; {fix}. Set "
                               f"{SKIP_MEMORY_CHECK_ENV}=1 to try anyway")


class MemoryCheckError(ValueError):
    """A request or a model would not fit in the available memory (raised before allocating it)."""


def check_export_folder(folder: str | os.PathLike, manifest: Manifest, model_file: str = MODEL_FILE) -> GraphSummary:
    """Check an export folder before creating an ONNX Runtime session on it.

    Checks, in order: ``model_file`` is a complete ONNX file; every external-data reference is a
    relative path inside ``folder`` and lies within its (not truncated) file; the manifest's P,
    layer count, KV heads, head_dim and vocabulary agree with the graph; the weights fit in the
    available memory (warning above 1/:data:`LOAD_MEMORY_FACTOR` of it). The tokenizer is checked
    when it is loaded (:meth:`parscale_edge.tokenizer.Tokenizer.from_dir` calls
    :func:`parscale_edge.tokenizer.check_tokenizer`).

    Returns:
        The :class:`GraphSummary` of ``model_file``.
    Raises:
        ExportFolderError (a ManifestError): naming the file at fault and the fix.
    """
    folder = Path(folder)
    g = read_graph_summary(folder / model_file)
    weight_bytes = _check_external(folder, model_file, g)
    _check_graph_matches_manifest(folder, model_file, g, manifest)
    _check_memory(folder, weight_bytes)
    return g
