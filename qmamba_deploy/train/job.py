"""The ``qmamba-deploy train`` job (:func:`train_restoration`) and :func:`run_job`, which the QAT job reuses."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import (
    check_outputs,
    check_writable,
    jsonable,
    make_manifest,
    write_json,
)
from ..checkpoints import load_model, save_checkpoint
from ..data.datasets import PatchStream, load_pairs
from ..data.degrade import Degradation
from ..errors import OptionError
from ..evaluate import evaluate_model
from ..models import build_model
from ..models.routing import routing_mode
from ..ops import scan_cpu
from ..quant import fake_quant_cpu
from .dist import DistInfo, barrier, init_distributed
from .folder import RUN_KIND, RunFolder
from .loop import FitResult, LoopConfig, fit
from .losses import DEFAULT_LOSS, LOSSES, Schedule


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

def build_training_model(cfg: TrainConfig) -> nn.Module:
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


def cpu_kernels(device: str | torch.device) -> dict[str, str] | None:
    """On a CPU, which implementation ran the scan and the fake quantizers' training passes ('compiled'
    C or 'torch'): the same forward values either way, gradients that differ in the last bits, so a
    retrained run follows another path. None on other devices."""
    if torch.device(device).type != "cpu":
        return None
    return {"scan": scan_cpu.backend(), "fake_quant": fake_quant_cpu.backend()}


def _check_resumable(folder: RunFolder, cfg: TrainConfig, world_size: int) -> None:
    if folder.last_checkpoint() is None or not folder.run.is_file():
        return
    previous = json.loads(folder.run.read_text())
    current = jsonable(cfg.as_dict())
    keys = [k for k in current if k not in ("device", "val_every", "log_every", "save_every", "val_data")]
    before = previous.get("config", {})
    # a setting the run's record lacks (an option added since) is unchanged while it has its default
    defaults = jsonable({f.name: f.default for f in fields(cfg) if f.default is not MISSING})
    changed = [k for k in keys if before.get(k, defaults.get(k)) != current[k]]
    if previous.get("world_size") != world_size:
        changed.append(f"world size ({previous.get('world_size')} -> {world_size})")
    if changed:
        raise OptionError(f"{folder.root} holds a run with other settings ({', '.join(changed)}); rerun it with "
                          f"the same options to resume, or pass a new --out")

@dataclass
class Job:
    """What a training job trains: a model, its loss, its parameter groups, and what its manifest adds.

    ``prepare(sampler)`` runs once the training patches exist (calibration);
    ``batches(sampler)`` may replace the sampler's batches (e.g. adding a
    teacher's output to the target); ``finish()`` runs when training ends, however
    it ends (e.g. removing hooks the loss read).
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, Any], torch.Tensor]
    param_groups: list[dict[str, Any]]
    manifest: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any], None] | None = None
    batches: Callable[[Any], Callable[[int, int], tuple[torch.Tensor, Any]]] | None = None
    finish: Callable[[], None] | None = None

def _restoration_job(cfg: TrainConfig, info: DistInfo) -> Job:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_training_model(cfg)
    return Job(model, LOSSES[cfg.loss_name], [{"params": [p for p in model.parameters() if p.requires_grad],
                                                "lr": cfg.lr}])

def make_validator(val_pairs, deg, info: DistInfo) -> Callable[[nn.Module], dict[str, Any]] | None:
    """validate(model) -> mean scores on ``val_pairs`` (deterministic routing), or None without pairs."""
    if not val_pairs:
        return None

    def validate(net: nn.Module) -> dict[str, Any]:
        with routing_mode(net, "deterministic"):
            report = evaluate_model(net, val_pairs, deg, device=info.device)
        return {k: round(v, 6) for k, v in report.summary.items()}

    return validate

def run_job(cfg: TrainConfig, out: str | os.PathLike, make_job: Callable[[TrainConfig, DistInfo], Job],
            job_name: str = "qmamba-deploy train", command: str | None = None,
            on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> FitResult:
    """Data -> ``make_job`` (model, loss, groups) -> :func:`fit` -> ``out/model.safetensors``.

    ``train`` and the QAT path of ``quantize`` are both this function with
    their own ``make_job``.
    """

    info = init_distributed(cfg.device)
    folder = RunFolder(out)
    deg = cfg.degradation()
    if info.is_main:
        _check_resumable(folder, cfg, info.world_size)
    job = make_job(cfg, info)
    channels = int(getattr(job.model, "in_chans", 3))
    sampler = PatchStream(cfg.data, cfg.patch, cfg.batch, cfg.seed).sampler(deg, channels)
    val_pairs = load_pairs(cfg.val_data, deg, channels, split="eval") if cfg.val_data else None
    if job.prepare is not None and folder.last_checkpoint() is None:
        job.prepare(sampler)  # a resumed run loads the prepared state from its checkpoint
    if info.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.ckpt_dir.mkdir(exist_ok=True)
        if not folder.run.is_file() or folder.last_checkpoint() is None:
            write_json(folder.run, make_manifest(RUN_KIND, config=cfg.as_dict(), command=command, job=job_name,
                                                 world_size=info.world_size, device=info.device,
                                                 cpu_kernels=cpu_kernels(info.device),
                                                 train_images=[p.name for p in sampler.pairs]))
    barrier(info)

    loop = LoopConfig(iters=cfg.iters, ema=cfg.ema, grad_clip=cfg.grad_clip, val_every=cfg.val_every,
                      save_every=cfg.save_every, log_every=cfg.log_every, seed=cfg.seed, progress=progress,
                      schedule=Schedule(cfg.schedule, cfg.iters, tuple(cfg.milestones), cfg.gamma, cfg.warmup))
    try:
        with routing_mode(job.model, "gumbel"):
            batches = job.batches(sampler) if job.batches else sampler.batch
            result = fit(job.model, job.loss, job.param_groups, batches, loop, out,
                         validate=make_validator(val_pairs, deg, info), info=info, on_step=on_step)
    finally:
        if job.finish is not None:
            job.finish()
    if info.is_main:
        shipped = result.model.to("cpu")
        if hasattr(shipped, "set_routing"):
            shipped.set_routing("deterministic")
        provenance = {"trained_by": job_name, "command": command, "config": cfg.as_dict(),
                      "iterations": result.iteration, "world_size": info.world_size,
                      "train_images": [p.name for p in sampler.pairs],
                      "weights": "ema" if cfg.ema else "raw", "rank_digests": result.rank_digests,
                      "cpu_kernels": cpu_kernels(info.device)}
        extra = {"task": deg.as_dict(), **job.manifest}
        if result.validation:
            extra["validation"] = {"data": cfg.val_data, **result.validation}
        save_checkpoint(shipped, folder.root / "model.safetensors", provenance=provenance, extra=extra)
    barrier(info)
    return result

def check_run_folder(cfg: TrainConfig, out: str | os.PathLike) -> None:
    """Before any work: the run folder can be written and holds none of the job's inputs."""

    check_writable(out, "--out")
    reads = {"--init": cfg.init, "--checkpoint": getattr(cfg, "checkpoint", None) or None,
             "--data": cfg.data, "--val-data": cfg.val_data}
    check_outputs({k: v for k, v in reads.items() if v and v != "builtin"}, folders={"--out": out})

def train_restoration(cfg: TrainConfig, out: str | os.PathLike, command: str | None = None,
                      on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> FitResult:
    """The ``qmamba-deploy train`` job: a model built from ``cfg.arch`` trained on ``cfg.data``."""
    check_run_folder(cfg, out)
    return run_job(cfg, out, _restoration_job, "qmamba-deploy train", command, on_step, progress)
