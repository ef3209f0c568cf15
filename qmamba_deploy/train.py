"""Training: one loop for restoration training, QAT and SPR²Q.

:func:`fit` is the loop. It takes a model, a loss, parameter groups and a
batch function, and owns everything around them: DistributedDataParallel
(``torchrun``; gloo on CPU, NCCL on GPU), the learning-rate schedule, an
optional EMA of the weights, periodic validation, a JSONL log, a progress
bar, and checkpoints that a rerun of the same command resumes from with
nothing lost.

Determinism is by construction, not by saved RNG state: batch ``i`` of rank
``r`` is a pure function of ``(seed, i, r)`` (see
:class:`~qmamba_deploy.data.datasets.PatchSampler`), the torch RNG is
re-seeded from ``(seed, i, r)`` before every step (gumbel routing, drop
path), and the schedule is a pure function of ``i``. A run interrupted at
any point and resumed from its last checkpoint therefore reaches bit for bit
the weights of an uninterrupted run (the tests check it).

:func:`train_restoration` is the ``qmamba-deploy train`` job: it builds a
model and a :class:`~qmamba_deploy.data.datasets.PatchSampler` from a
:class:`TrainConfig` and calls :func:`fit`.

Run folder (``--out``)::

    run.json                  manifest: config, command, world size
    log.jsonl                 {"iter", "loss", "lr", ...} and {"iter", "val": {...}}
    checkpoints/iter_000500.safetensors (+ .json)   weights (EMA weights when EMA is on)
    checkpoints/iter_000500.state.pt                optimizer, raw weights, EMA; weights_only-safe
    last.json                 the newest complete checkpoint (written last, atomically)
    model.safetensors (+ .json)  the final model, with the final validation in its manifest
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, OptionError
from .manifest import atomic_path, make_manifest, write_json, write_text

RUN_KIND = "qmamba-deploy/train-run"
STATE_KIND = "qmamba-deploy/train-state"

# ------------------------------------------------------------------------------ losses


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + eps^2)), as in BasicSR's CharbonnierLoss."""
    return torch.sqrt((pred - target).pow(2) + eps * eps).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,
    "charbonnier": charbonnier_loss,
    "mse": F.mse_loss,
}
DEFAULT_LOSS = {"sr": "l1", "denoise": "charbonnier", "jpeg": "charbonnier"}

# ---------------------------------------------------------------------------- schedule

SCHEDULES = ("multistep", "cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    """Learning-rate factor as a pure function of the iteration (so resuming needs no state).

    ``milestones`` are fractions of ``total`` for ``multistep`` (BasicSR's
    MultiStepLR at 50/80/90/95 % by default); ``cosine`` decays to
    ``eta_min`` x the base rate; ``warmup`` iterations ramp up linearly first.
    """

    kind: str = "multistep"
    total: int = 1000
    milestones: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    gamma: float = 0.5
    warmup: int = 0
    eta_min: float = 0.01

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise OptionError(f"--schedule {self.kind!r} is unknown; use {', '.join(SCHEDULES)}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise OptionError(f"--milestones {list(self.milestones)} must be fractions of the run in (0, 1)")

    def factor(self, it: int) -> float:
        """Factor for the step that makes iteration ``it`` (0-based) -> ``it + 1``."""
        if self.warmup and it < self.warmup:
            return (it + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "multistep":
            return self.gamma ** sum(it >= round(m * self.total) for m in self.milestones)
        span = max(self.total - self.warmup, 1)
        t = min(max(it - self.warmup, 0) / span, 1.0)
        return self.eta_min + (1 - self.eta_min) * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's parameters and buffers (BasicSR's model_ema)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(src[k].detach(), alpha=1 - self.decay)
            else:
                v.copy_(src[k])


# ------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone).

    GPUs use NCCL with one device per local rank; CPUs use gloo, so the
    same code path is tested on a CPU machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
        device = f"cuda:{local}" if world > 1 else device
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world, local, device)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def state_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _gather_digests(model: nn.Module, info: DistInfo) -> list[str]:
    digest = state_digest(model)
    if not info.distributed:
        return [digest]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, digest)
    return out


# ------------------------------------------------------------------------------ the loop


@dataclass
class LoopConfig:
    """What :func:`fit` needs beyond the model, loss and data."""

    iters: int = 1000
    schedule: Schedule = field(default_factory=Schedule)
    ema: float = 0.0  # decay; 0 = off
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    val_every: int = 0  # 0 = only at the end
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    progress: bool = True


@dataclass
class FitResult:
    model: nn.Module  # the weights to ship: EMA when enabled, else the trained weights
    iteration: int
    resumed_from: int | None
    validation: dict[str, Any] | None
    rank_digests: list[str]
    seconds: float


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj.to(device, non_blocking=True)


def _step_seed(seed: int, it: int, rank: int) -> int:
    return (seed * 1_000_003 + it * 7919 + rank) % (2 ** 63)


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


class RunFolder:
    """The files of one training run (see the module docstring) and their atomic updates."""

    def __init__(self, out: str | os.PathLike):
        self.root = Path(out)
        self.ckpt_dir = self.root / "checkpoints"
        self.log = self.root / "log.jsonl"
        self.last = self.root / "last.json"
        self.run = self.root / "run.json"

    def weights(self, it: int) -> Path:
        return self.ckpt_dir / f"iter_{it:06d}.safetensors"

    def state(self, it: int) -> Path:
        return self.ckpt_dir / f"iter_{it:06d}.state.pt"

    def last_checkpoint(self) -> dict[str, Any] | None:
        if not self.last.is_file():
            return None
        return json.loads(self.last.read_text())

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, upto: int) -> None:
        """Drop log lines of iterations after ``upto`` (written before an interruption)."""
        if not self.log.is_file():
            return
        keep = [line for line in self.log.read_text().splitlines()
                if line.strip() and json.loads(line).get("iter", 0) <= upto]
        write_text(self.log, "".join(line + "\n" for line in keep))


def _save(folder: RunFolder, it: int, model: nn.Module, optimizer, ema: EMA | None, ship: nn.Module,
          keep: int = 2) -> None:
    from .checkpoints import save_checkpoint

    save_checkpoint(ship, folder.weights(it), provenance={"iteration": it, "run": str(folder.root)})
    state = {"kind": STATE_KIND, "iteration": it, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "ema": ema.model.state_dict() if ema else None}
    with atomic_path(folder.state(it)) as tmp:
        torch.save(state, tmp)
    write_json(folder.last, {"iteration": it, "weights": folder.weights(it).name, "state": folder.state(it).name})
    # older checkpoints are only removed once the new one is complete and pointed at
    done = sorted(folder.ckpt_dir.glob("iter_*.state.pt"))
    for old in done[:-keep]:
        stem = old.name[: -len(".state.pt")]
        for path in (old, folder.ckpt_dir / f"{stem}.safetensors", folder.ckpt_dir / f"{stem}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _load_state(folder: RunFolder, model: nn.Module, optimizer, ema: EMA | None) -> int:
    last = folder.last_checkpoint()
    state_file = folder.ckpt_dir / last["state"]
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one sentence
        raise CheckpointError(f"{state_file} could not be read ({exc.__class__.__name__}); delete {folder.last} "
                              f"to restart the run from scratch, or pass a new --out") from None
    if state.get("kind") != STATE_KIND:
        raise CheckpointError(f"{state_file} is not a training state written by qmamba-deploy train")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if state["ema"] is None:
            raise CheckpointError(f"{state_file} was saved without EMA but this run has --ema; use the same options")
        ema.model.load_state_dict(state["ema"])
    return int(state["iteration"])


def fit(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        param_groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter],
        batches: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], cfg: LoopConfig, out: str | os.PathLike,
        validate: Callable[[nn.Module], dict[str, Any]] | None = None, info: DistInfo | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        on_step: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.iters`` iterations, resuming from ``out`` if it holds a checkpoint.

    ``batches(it, rank)`` returns ``(input, target)`` for iteration ``it``;
    ``param_groups`` is what a torch optimizer takes (groups may set their
    own ``lr``); ``optimizer`` defaults to Adam(betas=(0.9, 0.99)) at
    lr 2e-4. ``validate(model)`` returns a dict of metrics (run on rank 0 with
    the EMA weights when EMA is on). ``on_step(it, loss)`` is called after
    every step (the tests use it to simulate an interruption).
    """
    info = info or DistInfo()
    folder = RunFolder(out)
    device = torch.device(info.device)
    model.to(device)
    opt = (optimizer or (lambda groups: torch.optim.Adam(groups, lr=2e-4, betas=(0.9, 0.99))))(param_groups)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    ema = EMA(model, cfg.ema) if cfg.ema else None

    start, resumed = 0, None
    if folder.last_checkpoint() is not None:
        start = resumed = _load_state(folder, model, opt, ema)
        if info.is_main:
            folder.truncate_log(start)
    _barrier(info)
    net: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ship = ema.model if ema else model

    bar = None
    if info.is_main and cfg.progress and start < cfg.iters:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr)
    t0, validation = time.perf_counter(), None
    it = start
    model.train()
    try:
        while it < cfg.iters:
            torch.manual_seed(_step_seed(cfg.seed, it, info.rank))
            x, y = batches(it, info.rank)
            lr = _set_lr(opt, cfg.schedule.factor(it))
            loss = loss_fn(net(x.to(device, non_blocking=True)), _to_device(y, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at iteration {it + 1}; lower --lr "
                                         f"(now {opt.param_groups[0]['initial_lr']:g}) or set --grad-clip")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema:
                ema.update(model)
            it += 1
            value = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
            if info.is_main and (it % cfg.log_every == 0 or it == cfg.iters):
                folder.append_log({"iter": it, "loss": value, "lr": lr,
                                   "elapsed_s": round(time.perf_counter() - t0, 3)})
            if on_step is not None:
                on_step(it, value)
            if validate is not None and info.is_main and (
                    (cfg.val_every and it % cfg.val_every == 0) or it == cfg.iters):
                validation = validate(ship)
                folder.append_log({"iter": it, "val": validation})
                line = f"iter {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()
                                                  if isinstance(v, float))
                bar.write(line) if bar is not None else print(line, file=sys.stderr)
            if info.is_main and (it % cfg.save_every == 0 or it == cfg.iters):
                _save(folder, it, model, opt, ema, ship)
    except KeyboardInterrupt:
        # an interrupted step never reached opt.step(); save what is complete and stop
        if info.is_main and it > start and (folder.last_checkpoint() or {}).get("iteration") != it:
            _save(folder, it, model, opt, ema, ship)
            print(f"\ninterrupted: saved iteration {it} to {folder.root}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    if validate is not None and info.is_main and validation is None:
        validation = validate(ship)  # a rerun of a finished run still reports its validation
    digests = _gather_digests(ship, info)
    if info.is_main and len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights ({digests}); DistributedDataParallel lost sync")
    _barrier(info)
    return FitResult(ship, it, resumed, validation, digests, time.perf_counter() - t0)


# -------------------------------------------------------------------- restoration job


@dataclass
class TrainConfig:
    """Everything ``qmamba-deploy train`` takes; stored in run.json and in the model's manifest."""

    arch: str = "mambairv2-tiny-x2"
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "sr"
    scale: int = 2
    sigma: float = 25.0
    quality: int = 40
    data: str = "builtin"
    val_data: str | None = "builtin"  # None: no validation
    patch: int = 48  # model input size
    batch: int = 8  # per rank
    iters: int = 1000
    lr: float = 2e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    gamma: float = 0.5
    warmup: int = 0
    ema: float = 0.0
    grad_clip: float = 0.0
    loss: str | None = None  # default by task
    init: str | None = None  # start from these weights
    val_every: int = 0
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"

    def degradation(self):
        from .data.degrade import Degradation

        return Degradation(self.task, self.scale, self.sigma, self.quality)

    @property
    def loss_name(self) -> str:
        name = self.loss or DEFAULT_LOSS[self.task]
        if name not in LOSSES:
            raise OptionError(f"--loss {name!r} is unknown; use {', '.join(LOSSES)}")
        return name

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@contextlib.contextmanager
def _routing(model: nn.Module, mode: str) -> Iterator[None]:
    """Train MambaIRv2 with gumbel routing (as the official training) and evaluate it deterministically."""
    if not hasattr(model, "set_routing"):
        yield
        return
    modes = {m.routing for m in model.modules() if hasattr(m, "routing") and isinstance(m.routing, str)}
    model.set_routing(mode)
    try:
        yield
    finally:
        model.set_routing(modes.pop() if len(modes) == 1 else "deterministic")


def build_training_model(cfg: TrainConfig) -> nn.Module:
    from .checkpoints import load_model
    from .models import build_model

    kwargs = dict(cfg.kwargs)
    model = build_model(cfg.arch, **kwargs)
    deg = cfg.degradation()
    if int(getattr(model, "upscale", 1)) != deg.out_scale:
        raise OptionError(f"--arch {cfg.arch} upscales x{model.upscale} but --task {cfg.task} needs "
                          f"x{deg.out_scale}; pick a matching preset or pass --kwarg upscale={deg.out_scale}")
    if cfg.init:
        init = load_model(cfg.init)
        model.load_state_dict(init.state_dict())
    return model


def _check_resumable(folder: RunFolder, cfg: TrainConfig, world_size: int) -> None:
    if folder.last_checkpoint() is None or not folder.run.is_file():
        return
    previous = json.loads(folder.run.read_text())
    current = _jsonable(cfg.as_dict())
    keys = [k for k in current if k not in ("device", "val_every", "log_every", "save_every", "val_data")]
    changed = [k for k in keys if previous.get("config", {}).get(k) != current[k]]
    if previous.get("world_size") != world_size:
        changed.append(f"world size ({previous.get('world_size')} -> {world_size})")
    if changed:
        raise OptionError(f"{folder.root} holds a run with other settings ({', '.join(changed)}); rerun it with "
                          f"the same options to resume, or pass a new --out")


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v))


@dataclass
class Job:
    """What a training job trains: a model, its loss, its parameter groups, and what its manifest adds.

    ``prepare(sampler)`` runs once the training patches exist (calibration);
    ``batches(sampler)`` may replace the sampler's batches (e.g. adding a
    teacher's output to the target).
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, Any], torch.Tensor]
    param_groups: list[dict[str, Any]]
    manifest: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any], None] | None = None
    batches: Callable[[Any], Callable[[int, int], tuple[torch.Tensor, Any]]] | None = None


def _restoration_job(cfg: TrainConfig, info: DistInfo) -> Job:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_training_model(cfg)
    return Job(model, LOSSES[cfg.loss_name], [{"params": [p for p in model.parameters() if p.requires_grad],
                                                "lr": cfg.lr}])


def make_validator(val_pairs, deg, info: DistInfo) -> Callable[[nn.Module], dict[str, Any]] | None:
    """validate(model) -> mean scores on ``val_pairs`` (deterministic routing), or None without pairs."""
    if not val_pairs:
        return None
    from .evaluate import evaluate_model

    def validate(net: nn.Module) -> dict[str, Any]:
        with _routing(net, "deterministic"):
            report = evaluate_model(net, val_pairs, deg, device=info.device)
        return {k: round(v, 6) for k, v in report.summary.items()}

    return validate


def run_job(cfg: TrainConfig, out: str | os.PathLike, make_job: Callable[[TrainConfig, DistInfo], Job],
            kind: str = "qmamba-deploy train", command: str | None = None,
            on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> FitResult:
    """Data -> ``make_job`` (model, loss, groups) -> :func:`fit` -> ``out/model.safetensors``.

    ``train`` and the QAT path of ``quantize`` are both this function with
    their own ``make_job``.
    """
    from .checkpoints import save_checkpoint
    from .data.datasets import PatchSampler, load_pairs

    info = init_distributed(cfg.device)
    folder = RunFolder(out)
    deg = cfg.degradation()
    if info.is_main:
        _check_resumable(folder, cfg, info.world_size)
    job = make_job(cfg, info)
    channels = int(getattr(job.model, "in_chans", 3))
    sampler = PatchSampler(load_pairs(cfg.data, deg, channels, split="train"), deg, cfg.patch, cfg.batch,
                           seed=cfg.seed)
    val_pairs = load_pairs(cfg.val_data, deg, channels, split="eval") if cfg.val_data else None
    if job.prepare is not None and folder.last_checkpoint() is None:
        job.prepare(sampler)  # a resumed run loads the prepared state from its checkpoint
    if info.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.ckpt_dir.mkdir(exist_ok=True)
        if not folder.run.is_file() or folder.last_checkpoint() is None:
            write_json(folder.run, make_manifest(RUN_KIND, config=cfg.as_dict(), command=command, job=kind,
                                                 world_size=info.world_size, device=info.device,
                                                 train_images=[p.name for p in sampler.pairs]))
    _barrier(info)

    loop = LoopConfig(iters=cfg.iters, ema=cfg.ema, grad_clip=cfg.grad_clip, val_every=cfg.val_every,
                      save_every=cfg.save_every, log_every=cfg.log_every, seed=cfg.seed, progress=progress,
                      schedule=Schedule(cfg.schedule, cfg.iters, tuple(cfg.milestones), cfg.gamma, cfg.warmup))
    with _routing(job.model, "gumbel"):
        batches = job.batches(sampler) if job.batches else sampler.batch
        result = fit(job.model, job.loss, job.param_groups, batches, loop, out,
                     validate=make_validator(val_pairs, deg, info), info=info, on_step=on_step)
    if info.is_main:
        shipped = result.model.to("cpu")
        if hasattr(shipped, "set_routing"):
            shipped.set_routing("deterministic")
        provenance = {"trained_by": kind, "command": command, "config": cfg.as_dict(),
                      "iterations": result.iteration, "world_size": info.world_size,
                      "train_images": [p.name for p in sampler.pairs],
                      "weights": "ema" if cfg.ema else "raw", "rank_digests": result.rank_digests}
        extra = {"task": deg.as_dict(), **job.manifest}
        if result.validation:
            extra["validation"] = {"data": cfg.val_data, **result.validation}
        save_checkpoint(shipped, folder.root / "model.safetensors", provenance=provenance, extra=extra)
    _barrier(info)
    return result


def check_run_folder(cfg: TrainConfig, out: str | os.PathLike) -> None:
    """Before any work: the run folder can be written and holds none of the job's inputs."""
    from .artifacts import check_outputs, check_writable

    check_writable(out, "--out")
    reads = {"--init": cfg.init, "--checkpoint": getattr(cfg, "checkpoint", None) or None,
             "--data": cfg.data, "--val-data": cfg.val_data}
    check_outputs({k: v for k, v in reads.items() if v and v != "builtin"}, folders={"--out": out})


def train_restoration(cfg: TrainConfig, out: str | os.PathLike, command: str | None = None,
                      on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> FitResult:
    """The ``qmamba-deploy train`` job: a model built from ``cfg.arch`` trained on ``cfg.data``."""
    check_run_folder(cfg, out)
    return run_job(cfg, out, _restoration_job, "qmamba-deploy train", command, on_step, progress)


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
