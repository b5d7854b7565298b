"""Stage-2 training of ParScale streams on a (by default frozen) backbone.

The paper's cheapest route to a ParScale model (Chen et al. 2025, Sec. 3.4 "two-stage
training"; docs/parscale.md "Two-stage training"): keep a pretrained dense model, add P per-layer KV prefixes and
the aggregator (initialised by :meth:`parscale_edge.model.ParScaleForCausalLM.init_parscale`), and train
only those on a little data. The result is an adapter (:mod:`parscale_edge.adapter`) of a few MB per P.

``parallel=1, prefix=True`` trains the prefix-tuning control instead: one stream with its own
per-layer KV prefix (same slots, same initialisation rule), no aggregator (README "Does ParScale
help, or is it prefix tuning?"). It separates what P streams buy from what a trained prefix alone
(domain adaptation of a frozen backbone) buys.

One loop serves one process or many: under ``torchrun`` / ``accelerate launch`` (environment
variables ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``) :func:`init_distributed` starts a process group
(gloo on CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel, and each process takes
its share of every micro-batch (:class:`parscale_edge.corpus.BlockOrder`). Only rank 0 evaluates and writes.

Optimisation: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient
accumulation, gradient clipping (global L2 norm), bf16 autocast on CUDA and float32 on CPU. Held-out
perplexity every ``eval_every`` steps, a checkpoint every ``checkpoint_every`` steps written
atomically; ``resume=True`` continues from the last checkpoint with the same data order and
reaches the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import backbone_sha256, is_parscale_tensor, save_adapter, share_backbone
from .atomic import current_umask, write_json
from .corpus import BlockOrder, tokens_sha256
from .evaluate import perplexity
from .loading import LoadedModel, convert_to_parscale
from .model import ParScaleForCausalLM

CHECKPOINT_FILE = "checkpoint.safetensors"
ADAPTER_FILE = "adapter.safetensors"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"


class TrainError(ValueError):
    """A training setting, output folder or checkpoint cannot be used (message says which and why)."""


@dataclass
class TrainConfig:
    """Settings of one run. Every field except the eval/checkpoint/log cadence decides the weights,
    so ``--resume`` refuses a checkpoint written with different values.

    Units: ``seq_len`` tokens per sequence; ``batch`` sequences per micro-batch *per process*;
    ``steps`` optimizer steps; one step sees ``seq_len * batch * grad_accum * world`` tokens.
    """

    parallel: int = 2
    prefix: bool = False  # with parallel=1: the prefix-tuning control (P=1 + KV prefix, no aggregator)
    prefix_tokens: int = 48  # prefix slots per layer and stream of a conversion (48 in every release)
    steps: int = 100
    seq_len: int = 512
    batch: int = 1
    grad_accum: int = 4
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    full: bool = False  # train every weight (default: only prefixes + aggregator, backbone frozen)
    seed: int = 0  # ParScale init noise and data order
    eval_every: int = 25
    eval_positions: int = 1024
    eval_window: int = 512
    checkpoint_every: int = 25

    CADENCE = ("eval_every", "eval_positions", "eval_window", "checkpoint_every")

    def validate(self) -> None:
        """Raise TrainError naming the first bad setting."""
        if self.parallel < 1 or (self.parallel == 1 and not self.prefix):
            raise TrainError(f"--parallel must be >= 2 for a ParScale model, or 1 with --prefix (the "
                             f"prefix-tuning control), got {self.parallel}")
        if self.prefix and self.parallel != 1:
            raise TrainError(f"--prefix is the P=1 control (every P > 1 has prefixes); got --parallel {self.parallel}")
        for name in ("prefix_tokens", "steps", "seq_len", "batch", "grad_accum", "eval_every", "checkpoint_every", "eval_window"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TrainError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0 and self.weight_decay >= 0
                and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.clip >= 0):
            raise TrainError("need --lr > 0, 0 <= --min-lr-ratio <= 1, --warmup >= 0, --weight-decay >= 0, "
                             "--clip >= 0 (0: no clipping)")

    def tokens_per_step(self, world: int = 1) -> int:
        return self.seq_len * self.batch * self.grad_accum * world

    def decisive(self) -> dict:
        """The fields that determine the trajectory (compared on resume; ``prefix`` only when set, so
        checkpoints written before the field existed still resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.CADENCE and not (k == "prefix" and not v)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``, then
    cosine from ``lr`` to ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """Where this process runs: ``rank``/``world`` (1 process: 0/1), its device, and whether a
    process group was started here (then :func:`close_distributed` ends it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Read the torchrun/accelerate environment and start a process group when ``WORLD_SIZE`` > 1
    (gloo on CPU, nccl on CUDA; one GPU per process, ``LOCAL_RANK``). ``device``: auto, cpu, cuda.

    Raises TrainError for ``cuda`` without a GPU."""
    import torch.distributed as tdist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but PyTorch sees no GPU (a CPU build of torch, or no driver)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo")
        started = True
    return Dist(rank, world, local, dev, started)


def close_distributed(d: Dist) -> None:
    """End the process group started by :func:`init_distributed` (no-op otherwise)."""
    import torch.distributed as tdist

    if d.started and tdist.is_initialized():
        tdist.destroy_process_group()


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def _mean_across(d: Dist, value: float) -> float:
    if d.world == 1:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return float(t.item()) / d.world


# -------------------------------------------------------------------------------------- helpers
def dense_view(model: ParScaleForCausalLM) -> ParScaleForCausalLM:
    """The P=1 model on the same backbone parameters (shared, not copied): the dense parent of a
    frozen-backbone ParScale model."""
    with torch.device("meta"):
        dense = ParScaleForCausalLM(model.config.with_parallel(1))
    share_backbone(dense, model)
    if model.config.tie_word_embeddings:
        dense.lm_head_zero_bias = torch.zeros(model.config.vocab_size, device=model.lm_head_weight.device)
    return dense.eval()


def _logits_fn(model: ParScaleForCausalLM, device: torch.device):
    def fn(ids: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(ids)).to(device)
        pos = torch.arange(t.shape[1], device=device)[None].expand_as(t)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            return model(t, torch.ones_like(t), pos)[0].float().cpu().numpy()
    return fn


def evaluate_perplexity(model: ParScaleForCausalLM, tokens: np.ndarray, positions: int, window: int,
                        device: torch.device | None = None) -> dict:
    """Sliding-window perplexity (:func:`parscale_edge.evaluate.perplexity`, stride window/2) of ``model`` on
    ``tokens`` (int [T]) over the first ``positions`` scored positions."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return perplexity(_logits_fn(model, device), tokens, window=window, max_positions=positions)
    finally:
        model.train(was)


def prepare_model(lm: LoadedModel, cfg: TrainConfig) -> LoadedModel:
    """The model to train: ``lm`` converted to ``cfg.parallel`` streams (or to the P=1 prefix-only
    control, ``cfg.prefix``) with ``cfg.prefix_tokens`` prefix slots when dense (seed ``cfg.seed``),
    or ``lm`` itself when it already is that (its ParScale parts are trained further; its own prefix
    length is kept).

    Raises TrainError when ``lm`` has another P, or a prefix-only model meets P > 1 or vice versa."""
    c = lm.model.config
    if not c.has_prefix:
        return convert_to_parscale(lm, cfg.parallel, n_tokens=cfg.prefix_tokens, seed=cfg.seed, prefix_only=cfg.prefix)
    if (c.parscale_n, c.parscale_prefix_only) != (cfg.parallel, cfg.prefix):
        what = "P=1 with a prefix only" if c.parscale_prefix_only else f"P={c.parscale_n} streams"
        flag = "--parallel 1 --prefix" if c.parscale_prefix_only else f"--parallel {c.parscale_n}"
        raise TrainError(f"{lm.source} already has {what}; train it with {flag} or start from its dense parent")
    return lm


@dataclass
class TrainResult:
    """What a run produced: final step, history (losses, evals), files written (rank 0)."""

    step: int
    history: dict
    adapter: Path | None
    model_dir: Path | None
    stopped_early: bool


def _save_checkpoint(path: Path, step: int, model, optimizer, history: dict, fingerprint: dict) -> None:
    """Trainable tensors and the optimizer's state tensors in safetensors, everything else as JSON in
    its metadata: no pickle, so ``--resume`` never executes anything from the run folder."""
    from safetensors.torch import save_file

    tensors = {f"trainable.{k}": v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    opt = optimizer.state_dict()
    state_meta = {}
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                state_meta.setdefault(str(idx), {})[name] = v
    meta = {"step": step, "history": history, "fingerprint": fingerprint, "param_groups": opt["param_groups"],
            "state_scalars": state_meta}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"checkpoint": json.dumps(meta)})
    os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates files private (0600)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """``{"step", "trainable", "optimizer", "history", "fingerprint"}`` from :func:`_save_checkpoint`.
    Raises TrainError for an unreadable file or settings that differ from the checkpoint's."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise TrainError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); start again "
                         "without --resume (and with --overwrite)") from None
    old = meta.get("fingerprint", {})
    for key in sorted(set(old) | set(fingerprint)):
        if old.get(key) != fingerprint.get(key):
            raise TrainError(f"--resume: {key} was {old.get(key)!r} in the checkpoint {path}, now "
                             f"{fingerprint.get(key)!r}; resume with the same settings, data and model")
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    trainable = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    return {"step": meta["step"], "trainable": trainable, "history": meta["history"], "fingerprint": old,
            "optimizer": {"state": state, "param_groups": meta["param_groups"]}}


def check_run_folder(out: Path, resume: bool, overwrite: bool, sources: Sequence[str] | None = None) -> None:
    """Raises TrainError unless ``out`` can take this run: a folder (or nothing yet), with a
    checkpoint for ``resume``, empty unless ``resume`` or ``overwrite``. With ``sources`` (the model
    and data specs; those that are no path are skipped) it also raises OutputPathError
    (:mod:`parscale_edge.atomic`) when ``out`` cannot be created, or when ``overwrite`` (without
    ``resume``) would replace a folder that is not a run folder of ours (checkpoint, adapter, history,
    curves, ``model/``) or that is or holds a source. Reads only; the CLI calls it before the (slow)
    model load, :func:`train` again."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out} exists and is not a folder; choose another output path")
    if resume and not (out / CHECKPOINT_FILE).exists():
        raise TrainError(f"--resume: no {CHECKPOINT_FILE} in {out}; start the run without --resume")
    if not resume and not overwrite and out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} is not empty; pass --resume to continue its run or --overwrite to start again")
    if sources is None:
        return
    from .atomic import check_creatable, check_replaceable

    check_creatable(out)
    if overwrite and not resume:
        check_replaceable(out, [s for s in sources if Path(s).exists()],
                          own_files={CHECKPOINT_FILE, ADAPTER_FILE, HISTORY_FILE, CURVES_FILE, "model"})


def training_files(data: list[str], evals: list[str]) -> tuple[list[Path], list[Path], str | None, str]:
    """(training files, held-out files, held-out text or None, its description) of the ``data`` and
    ``evals`` specs (files, folders, globs, ``stdlib``: :func:`parscale_edge.corpus.collect_files`;
    ``evals`` ``["stdlib"]``: the held-out standard-library modules, ``["none"]``: no evaluation).
    Raises TrainError when a held-out file is also training data."""
    from .corpus import FILE_SEPARATOR, collect_files, read_texts, stdlib_root
    from .evaluate import HELDOUT_MODULES, stdlib_text

    train_files = collect_files(data)
    if evals == ["none"]:
        return train_files, [], None, "none"
    if evals == ["stdlib"]:
        eval_files = [stdlib_root() / m for m in HELDOUT_MODULES]
        text, desc = stdlib_text(), "held-out Python standard-library modules (" + ", ".join(HELDOUT_MODULES) + ")"
    else:
        eval_files = collect_files(evals)
        text, desc = FILE_SEPARATOR.join(read_texts(eval_files)), f"{len(eval_files)} file(s)"
    overlap = {p.resolve() for p in train_files} & {p.resolve() for p in eval_files}
    if overlap:
        raise TrainError(f"{len(overlap)} evaluation file(s) are also training data, e.g. {sorted(overlap)[0]}; "
                         "held-out text must not be trained on")
    return train_files, eval_files, text, desc


def train(lm: LoadedModel, cfg: TrainConfig, train_tokens: np.ndarray, out_dir: str | os.PathLike,
          eval_tokens: np.ndarray | None = None, resume: bool = False, overwrite: bool = False,
          dist: Dist | None = None, progress: bool = True, stop_after: int | None = None,
          log=None) -> TrainResult:
    """Train the ParScale parts of ``lm`` (or all weights with ``cfg.full``) on ``train_tokens``.

    Args:
        lm: a dense model (converted to ``cfg.parallel`` streams here) or one with P = ``cfg.parallel``.
        train_tokens: int [T] token ids (:func:`parscale_edge.corpus.tokenize_texts`).
        out_dir: gets ``checkpoint.safetensors`` (every ``checkpoint_every`` steps and at the end),
            ``history.json`` (per-step loss, lr, grad norm, tokens; evals; wall time), ``curves.png``,
            and ``adapter.safetensors`` (frozen backbone) or ``model/`` (HF folder, ``full``).
        eval_tokens: held-out token ids; None skips evaluation. Evaluated at step 0 (the untrained
            conversion, and the dense P=1 parent on the same positions), every ``eval_every`` steps
            and at the end.
        resume: continue from ``out_dir/checkpoint.safetensors`` (settings, data and backbone must match).
        stop_after: stop after this many optimizer steps of this call without writing anything
            more (simulates a killed run; for tests).
        log: callable(str) for one-line messages (default: tqdm.write to stderr).
    Returns:
        :class:`TrainResult`.
    Raises:
        TrainError: bad settings, an existing output without ``resume``/``overwrite``, a missing or
            mismatching checkpoint, too little data.
    """
    from tqdm import tqdm

    cfg.validate()
    d = dist or Dist()
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    if d.main:
        check_run_folder(out, resume, overwrite)
        if not resume and out.exists() and any(out.iterdir()):  # --overwrite
            for name in (CHECKPOINT_FILE, ADAPTER_FILE, HISTORY_FILE, CURVES_FILE):  # our outputs only
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "model", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: tqdm.write(msg))
    _barrier(d)

    lm = prepare_model(lm, cfg)
    model = lm.model.float()
    backbone_hash = backbone_sha256(model)
    for name, p in model.named_parameters():
        p.requires_grad_(cfg.full or is_parscale_tensor(name))
    model.to(d.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    order = BlockOrder(train_tokens, cfg.seq_len, cfg.seed)
    fingerprint = {**cfg.decisive(), "world_size": d.world, "data_sha256": tokens_sha256(train_tokens),
                   "backbone_sha256": backbone_hash, "source": lm.source}
    history: dict = {"config": dataclasses.asdict(cfg), "source": lm.source, "backbone_sha256": backbone_hash,
                     "world_size": d.world, "device": str(d.device), "torch_threads": torch.get_num_threads(),
                     "train_tokens_available": int(train_tokens.size), "tokens_per_step": cfg.tokens_per_step(d.world),
                     "trainable_parameters": sum(p.numel() for p in params), "steps": [], "evals": [],
                     "train_seconds": 0.0}
    start = 0
    if resume:
        ck = _load_checkpoint(ckpt_path, fingerprint)
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in ck["trainable"].items():
                named[k].copy_(v.to(d.device))
        optimizer.load_state_dict(ck["optimizer"])
        start, history = ck["step"], ck["history"]
        if d.main:
            log(f"resumed {out} at step {start}/{cfg.steps}")

    ddp = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    def do_eval(step: int) -> None:
        if eval_tokens is None or not d.main:
            return
        r = evaluate_perplexity(model, eval_tokens, cfg.eval_positions, cfg.eval_window, d.device)
        row = {"step": step, "tokens": step * cfg.tokens_per_step(d.world), "perplexity": r["perplexity"],
               "nll": r["nll"], "positions": r["positions"]}
        if step == 0 and "dense" not in history:
            dr = evaluate_perplexity(dense_view(model), eval_tokens, cfg.eval_positions, cfg.eval_window, d.device)
            history["dense"] = {"perplexity": dr["perplexity"], "nll": dr["nll"], "positions": dr["positions"]}
            log(f"held-out perplexity, dense P=1 parent: {dr['perplexity']:.4f} ({dr['positions']} positions)")
        history["evals"].append(row)
        log(f"step {step}: held-out perplexity P={cfg.parallel}{' prefix' * cfg.prefix} {r['perplexity']:.4f}")

    def save(step: int, final: bool) -> None:
        if d.main:
            _save_checkpoint(ckpt_path, step, model, optimizer, history, fingerprint)
            if not cfg.full:
                save_adapter(model, out / ADAPTER_FILE, lm.source, backbone_hash)
            session["end_step"], session["wall_seconds"] = step, time.perf_counter() - t_wall
            write_json(out / HISTORY_FILE, history)
            try:
                from .plots import plot_training

                plot_training(history, out / CURVES_FILE)
            except ImportError:
                if final:
                    log("curves.png skipped: matplotlib is not installed (pip install 'parscale-edge[profile]')")
        _barrier(d)

    t_wall = time.perf_counter()
    session = {"start_step": start, "end_step": start, "wall_seconds": 0.0}
    history.setdefault("sessions", []).append(session)
    if start == 0:
        do_eval(0)
    V = model.config.vocab_size
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (progress and d.main), dynamic_ncols=True)
    t_session, tokens_session, stopped = time.perf_counter(), 0, False
    for step in range(start, cfg.steps):
        if stop_after is not None and step - start >= stop_after:
            stopped = True
            break
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            ids = torch.from_numpy(order.batch(step, micro, d.rank, d.world, cfg.batch, cfg.grad_accum)).to(d.device)
            pos = torch.arange(cfg.seq_len, device=d.device)[None].expand_as(ids)
            sync = d.world == 1 or micro == cfg.grad_accum - 1
            ctx = ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast("cuda", torch.bfloat16, enabled=d.device.type == "cuda"):
                    logits = ddp(ids, torch.ones_like(ids), pos)[0]
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_mean = _mean_across(d, loss_sum / cfg.grad_accum)
        dt = time.perf_counter() - t0
        history["train_seconds"] += dt
        tokens_session += cfg.tokens_per_step(d.world)
        tok_s = tokens_session / max(1e-9, time.perf_counter() - t_session)
        history["steps"].append({"step": step + 1, "tokens": (step + 1) * cfg.tokens_per_step(d.world), "loss": loss_mean,
                                 "lr": lr, "grad_norm": grad_norm, "seconds": dt})
        bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        bar.update(1)
        done = step + 1
        if done % cfg.eval_every == 0 and done != cfg.steps:
            do_eval(done)
        if done % cfg.checkpoint_every == 0 and done != cfg.steps:
            save(done, final=False)
    bar.close()
    if stopped:
        return TrainResult(start + stop_after, history, None, None, True)
    if start < cfg.steps or not history["evals"] or history["evals"][-1]["step"] != cfg.steps:
        do_eval(cfg.steps)
    history["tokens_trained"] = cfg.steps * cfg.tokens_per_step(d.world)
    save(cfg.steps, final=True)
    model_dir = None
    if cfg.full and d.main:
        from .loading import save_hf_folder

        model_dir = save_hf_folder(LoadedModel(model.cpu().eval(), lm.tokenizer, lm.source, lm.source_sha256,
                                               dict(lm.generation_config), lm.notes), out / "model", overwrite=True)
    return TrainResult(cfg.steps, history, None if cfg.full else out / ADAPTER_FILE, model_dir, False)



# ------------------------------------------------------------------------ one run, as `parscale train` makes it
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_training(model: str, cfg: TrainConfig, out: Path, train_files: Sequence[Path], eval_text: str | None,
                 eval_desc: str, *, tokens: int | None, steps: int | None, device: str = "auto",
                 resume: bool = False, overwrite: bool = False, threads: int | None = None, progress: bool = True,
                 log=_stderr) -> TrainResult | None:
    """One training run from a model spec and checked files (:func:`training_files`): start the
    processes' group (:func:`init_distributed`, ``device`` auto/cpu/cuda; PyTorch on CPU gets
    ``threads`` threads, default 1), load ``model`` (:func:`parscale_edge.loading.load_model`), tokenize
    ``train_files`` and ``eval_text``, set ``cfg.steps`` (``steps``, else ``tokens`` rounded up to whole
    steps of :meth:`TrainConfig.tokens_per_step` over all processes), say the data and the plan
    through ``log`` (two lines, rank 0; :func:`train`'s own lines use its default), then :func:`train`.

    A run that fails before writing anything leaves no empty ``out`` folder behind (when it made it).

    Returns the :class:`TrainResult` on rank 0, None on the other processes of a distributed run.
    Raises TrainError when ``model`` has no tokenizer, ``cfg.seq_len`` exceeds its context, or the
    data holds no block of ``cfg.seq_len`` + 1 tokens (:class:`parscale_edge.corpus.BlockOrder`), and
    what :func:`train` raises."""
    new_folder = not out.exists()
    dist = init_distributed(device)
    try:
        if dist.device.type == "cpu":
            from .loading import set_torch_threads

            set_torch_threads(threads)
        r = _run(model, cfg, out, train_files, eval_text, eval_desc, dist, tokens=tokens, steps=steps,
                 resume=resume, overwrite=overwrite, progress=progress, log=log)
    except BaseException:
        if new_folder and dist.main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        close_distributed(dist)
    return r if dist.main else None


def _run(model: str, cfg: TrainConfig, out: Path, train_files: Sequence[Path], eval_text: str | None,
         eval_desc: str, dist: Dist, *, tokens: int | None, steps: int | None, resume: bool, overwrite: bool,
         progress: bool, log) -> TrainResult:
    """The body of :func:`run_training` inside its process group."""
    from .corpus import read_texts, tokenize_texts
    from .loading import load_model

    lm = load_model(model, progress=progress and dist.main)
    if lm.tokenizer is None:
        raise TrainError(f"{model} has no tokenizer (tokenizer.json); training text cannot be tokenized")
    context = lm.model.config.max_position_embeddings
    if cfg.seq_len > context:
        raise TrainError(f"--seq-len {cfg.seq_len} is longer than {model}'s context of {context} tokens; "
                         f"use --seq-len {context} or less")
    t0 = time.perf_counter()
    train_tokens = tokenize_texts(lm.tokenizer, read_texts(train_files))
    BlockOrder(train_tokens, cfg.seq_len)  # the data check (one block at least) before anything is said or made
    eval_tokens = None if eval_text is None else np.asarray(lm.tokenizer.encode(eval_text), dtype=np.int64)
    per_step = cfg.tokens_per_step(dist.world)
    cfg.steps = steps or -(-tokens // per_step)
    if dist.main:
        log(f"data: {len(train_files)} files, {train_tokens.size} tokens (tokenized in "
            f"{time.perf_counter() - t0:.1f} s); eval: {eval_desc}"
            + (f", {eval_tokens.size} tokens" if eval_tokens is not None else ""))
        what = "prefixes (backbone frozen)" if cfg.prefix else "prefixes + aggregator (backbone frozen)"
        control = " (prefix only: the prefix-tuning control)" if cfg.prefix else ""
        n = cfg.steps
        log(f"training {'all weights' if cfg.full else what} of {model} at P={cfg.parallel}{control}: "
            f"{n} step{'s' if n != 1 else ''} x {per_step} tokens = {n * per_step} tokens "
            f"({n * per_step / max(1, train_tokens.size):.2f} epochs), {dist.world} process(es) on {dist.device}")
    return train(lm, cfg, train_tokens, out, eval_tokens=eval_tokens, resume=resume, overwrite=overwrite,
                 dist=dist, progress=progress)


def summary_lines(result: TrainResult, parallel: int) -> list[str]:
    """What a finished run reports: tokens, wall time and time in steps (s), where the adapter or
    model went; then the held-out perplexity (dense parent, untrained P=``parallel``, trained) when
    the run evaluated."""
    h = result.history
    wall = sum(s["wall_seconds"] for s in h.get("sessions", []))
    lines = [f"trained {h['tokens_trained']} tokens in {wall:.0f} s wall ({h['train_seconds']:.0f} s in steps) -> "
             f"{result.adapter or result.model_dir}"]
    if h.get("evals"):
        first, last = h["evals"][0], h["evals"][-1]
        line = f"held-out perplexity ({last['positions']} positions): "
        if "dense" in h:
            line += f"dense P=1 {h['dense']['perplexity']:.4f}, "
        lines.append(line + f"untrained P={parallel} {first['perplexity']:.4f}, trained {last['perplexity']:.4f}")
    return lines


def conversion_perplexity(dense: LoadedModel, converted: LoadedModel, positions: int, window: int) -> dict:
    """Held-out perplexity of a dense model and its conversion on the Python standard library's
    held-out modules (:func:`parscale_edge.evaluate.stdlib_text`, tokenized by ``dense``'s tokenizer),
    over the first ``positions`` scored positions of ``window``-token windows:
    ``{"positions", "window", "dense", "converted", "ratio"}`` (ratio converted / dense).

    Raises TrainError when ``dense`` has no tokenizer."""
    from .evaluate import stdlib_text

    if dense.tokenizer is None:
        raise TrainError(f"{dense.source} has no tokenizer: perplexity cannot be measured")
    tokens = dense.tokenizer.encode(stdlib_text())
    d, c = (evaluate_perplexity(m.model, tokens, positions, window) for m in (dense, converted))
    return {"positions": d["positions"], "window": window, "dense": d["perplexity"], "converted": c["perplexity"],
            "ratio": c["perplexity"] / d["perplexity"]}
