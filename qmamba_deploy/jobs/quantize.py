"""`qmamba-deploy quantize`: a float checkpoint -> a quantized checkpoint (QAT or PTQ).

* QAT methods (qmambair, dls, rfa, lsq, lsq+) insert their quantizers,
  initialise them on the first calibration batch (as Q-MambaIR does on its
  first training forward) and fine-tune with the shared training loop
  (:func:`qmamba_deploy.train.run_job`): resumable, DDP under ``torchrun``.
  The loss is L1 to the ground truth, optionally mixed with L1 to the float
  model's output (``distill`` = weight of the teacher term).
* PTQ methods (minmax, percentile, mse) run ``calib_batches`` batches of
  training patches through the observers and freeze them.

Either way the result is ``out/model.safetensors`` with a manifest holding
the qconfig, the source checkpoint, the settings and a validation on the
eval images; ``load_model``, ``eval`` and ``restore`` accept it.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import write_json
from ..checkpoints import load_model, save_checkpoint
from ..data.datasets import PatchStream, load_pairs
from ..errors import OptionError
from ..models.routing import routing_mode
from ..quant import calibrating
from ..quant.distill import BlockFeatures, feature_alignment
from ..quant.noise import ActivationDrop, MarginNoise
from ..quant.qconfig import SPR2Q_VARIANTS, QConfig, quantize_model
from ..quant.quantizers import STEP_INITS, Quantizer, set_step_init
from ..quant.spr2q import (
    BOUND_INITS,
    attach_rectifiers,
    fuse_rectifiers,
    hybrid_loss,
    rectified_layers,
    route_statically,
    set_bounds_init,
)
from ..train import (
    DistInfo,
    FitResult,
    Job,
    RunFolder,
    TrainConfig,
    adam,
    check_run_folder,
    init_distributed,
    make_validator,
    run_job,
)

JOB = "qmamba-deploy quantize"


@dataclass
class QuantizeConfig(TrainConfig):
    checkpoint: str = ""  # the float model
    method: str = "qmambair"
    w_bits: int = 4
    a_bits: int = 4
    scan_bits: int | None = None
    distill: float = 0.0  # weight of L1(student, teacher) in the QAT loss
    distill_features: float = 0.0  # weight of the block feature-alignment term in the QAT loss
    margin_noise: float = 0.0  # QAT: activation quantizer inputs perturbed by σ·U(−½, ½) steps (0: off)
    qdrop: float = 0.0  # QAT: fraction of activations left in float in training forwards (QDrop; 0: off)
    calib_batches: int = 4
    quant_lr: float | None = None  # learning rate of quantizer parameters (default: lr)
    step_init: str = "lsq"  # how learnable step sizes start (STEP_INITS): LSQ's rule or the MSE-optimal step
    w_granularity: str = "tensor"  # weight step sizes per tensor or per output channel
    keep_fp: tuple[str, ...] = ()  # precision policy: modules left in float (fnmatch patterns)
    overrides: tuple[tuple[str, int, int], ...] = ()  # and (pattern, w_bits, a_bits) per module

    def qconfig(self) -> QConfig:
        return QConfig(self.method, self.w_bits, self.a_bits, self.scan_bits, keep_fp=tuple(self.keep_fp),
                       overrides=tuple(tuple(o) for o in self.overrides), w_granularity=self.w_granularity)

    def __post_init__(self):
        self.qconfig()  # validates method and bit widths
        if not 0 <= self.distill <= 1:
            raise OptionError(f"--distill {self.distill} must be in [0, 1] (weight of the teacher term)")
        if self.distill_features < 0:
            raise OptionError(f"--distill-features {self.distill_features} must be >= 0 (weight of the block "
                              f"feature term)")
        if not 0 <= self.margin_noise <= 1:
            raise OptionError(f"--margin-noise {self.margin_noise} must be in [0, 1] (a fraction of a step; 0: off)")
        if not 0 <= self.qdrop < 1:
            raise OptionError(f"--qdrop {self.qdrop} must be in [0, 1) (the fraction of activations left in float "
                              f"during training; 0: off)")
        if self.calib_batches < 1:
            raise OptionError("--calib-batches must be at least 1")
        if self.step_init not in STEP_INITS:
            raise OptionError(f"--step-init {self.step_init!r} is unknown; use {' or '.join(STEP_INITS)}")
        if self.step_init != "lsq" and not self.trains_in_loop:
            raise OptionError(f"--step-init {self.step_init} starts the learnable step sizes of a QAT method; "
                              f"{self.method} has none (PTQ observers pick theirs with --method mse, SPR²Q its "
                              f"bounds with --bounds-init)")
        if self.margin_noise and not self.trains_in_loop:
            raise OptionError(f"--margin-noise perturbs the activation quantizers of a QAT method's training; "
                              f"{self.method} does not train in the QAT loop")
        if self.qdrop and not self.trains_in_loop:
            raise OptionError(f"--qdrop leaves activations in float during a QAT method's training; "
                              f"{self.method} does not train in the QAT loop")

    @property
    def trains_in_loop(self) -> bool:
        """A QAT method of the training loop (learnable step sizes, ``_qat_job``); not PTQ, not SPR²Q."""
        return self.method != "spr2q" and self.qconfig().recipe.qat


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> int:
    """Run ``batches`` through ``model`` with its quantizers in calibration mode; returns the count."""
    n = 0
    with torch.no_grad(), calibrating(model), routing_mode(model, "deterministic"):
        for x in batches:
            model(x.to(device))
            n += 1
    return n


def ptq(model: nn.Module, qconfig: QConfig, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu"
        ) -> nn.Module:
    """A PTQ copy of a float ``model``: quantizers inserted, calibrated on ``batches``, frozen (eval mode)."""
    if qconfig.recipe.qat:
        raise OptionError(f"{qconfig.method} is a QAT method; PTQ needs one of minmax, percentile, mse")
    q = quantize_model(copy.deepcopy(model), qconfig).to(device)
    calibrate(q, batches, device)
    return q.eval()


def _calibration_batches(cfg: QuantizeConfig, sampler) -> Iterable[torch.Tensor]:
    # iterations beyond the training range: calibration never reuses a training batch
    return (sampler.batch(cfg.iters + i, 0)[0] for i in range(cfg.calib_batches))


def _load_float(cfg: QuantizeConfig) -> nn.Module:
    fp = load_model(cfg.checkpoint)
    if fp.card.qconfig is not None:
        raise OptionError(f"{cfg.checkpoint} is already quantized ({fp.card.qconfig.label}); pass the float "
                          f"checkpoint")
    return fp.eval()


def _param_groups(model: nn.Module, cfg: QuantizeConfig) -> list[dict[str, Any]]:
    qparams = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)}
    float_params = [p for p in model.parameters() if p.requires_grad and id(p) not in qparams]
    quant_params = [p for p in model.parameters() if p.requires_grad and id(p) in qparams]
    groups = [{"params": float_params, "lr": cfg.lr}]
    if quant_params:
        groups.append({"params": quant_params, "lr": cfg.quant_lr if cfg.quant_lr is not None else cfg.lr})
    return groups


def _qat_job(cfg: QuantizeConfig, info: DistInfo) -> Job:
    fp = _load_float(cfg).to(info.device)
    model = quantize_model(copy.deepcopy(fp), cfg.qconfig())
    set_step_init(model, cfg.step_init)
    lam, mu = cfg.distill, cfg.distill_features
    taught = bool(lam or mu)  # the float model runs beside the student
    student_features = BlockFeatures(model, training_only=True).attach() if mu else None
    noise = MarginNoise(model, cfg.margin_noise).attach() if cfg.margin_noise else None
    drop = ActivationDrop(model, cfg.qdrop).attach() if cfg.qdrop else None

    def prepare(sampler) -> None:
        calibrate(model, _calibration_batches(cfg, sampler), info.device)

    def loss(pred: torch.Tensor, target) -> torch.Tensor:
        if not taught:
            return F.l1_loss(pred, target)
        gt, teacher, *features = target
        out = (1 - lam) * F.l1_loss(pred, gt) + lam * F.l1_loss(pred, teacher) if lam else F.l1_loss(pred, gt)
        if mu:
            out = out + mu * feature_alignment(student_features.values(), features)
        return out

    def batches(sampler):
        if not taught:
            return sampler.batch

        def with_teacher(it: int, rank: int):
            x, gt = sampler.batch(it, rank)
            with torch.no_grad(), routing_mode(fp, "deterministic"), BlockFeatures(fp) as t:
                teacher = fp(x.to(info.device))  # already where the loss runs: fit moves the rest there
            return x, (gt, teacher, *t.values()) if mu else (gt, teacher)

        return with_teacher

    def finish() -> None:  # the trained model carries no training hooks
        for hooks in (student_features, noise, drop):
            if hooks is not None:
                hooks.detach()

    return Job(model, loss, _param_groups(model, cfg), manifest={"quantized_from": str(cfg.checkpoint)},
               prepare=prepare, batches=batches, finish=finish)


@dataclass
class PTQResult:
    model: nn.Module
    validation: dict[str, Any] | None
    seconds: float


@dataclass
class _Calibrated:
    """A float model, its quantized copy calibrated on training patches, and what both were made from."""

    info: DistInfo
    deg: Any
    teacher: nn.Module
    model: nn.Module
    sampler: Any
    t0: float


def _calibrated(cfg: QuantizeConfig, prepare: Callable[[nn.Module], Any] | None = None) -> _Calibrated:
    """Float teacher, quantized copy (``prepare`` applied to it) calibrated on ``cfg.calib_batches``."""
    t0 = time.perf_counter()
    info = init_distributed(cfg.device)
    deg = cfg.degradation()
    teacher = _load_float(cfg).to(info.device)
    model = quantize_model(copy.deepcopy(teacher), cfg.qconfig()).to(info.device)
    if prepare is not None:
        prepare(model)
    channels = int(getattr(model, "in_chans", 3))
    sampler = PatchStream(cfg.data, cfg.patch, cfg.batch, cfg.seed).sampler(deg, channels)
    calibrate(model, _calibration_batches(cfg, sampler), info.device)
    return _Calibrated(info, deg, teacher, model, sampler, t0)


def qat_start(cfg: QuantizeConfig) -> nn.Module:
    """The quantized model a QAT run of ``cfg`` starts from: quantizers inserted, step sizes set by
    ``cfg.step_init`` on the same calibration batches the run uses, no training step taken (eval mode)."""
    if not cfg.trains_in_loop:
        raise OptionError(f"{cfg.method} is not a QAT method of the training loop; its start is its PTQ result")
    return _calibrated(cfg, prepare=lambda m: set_step_init(m, cfg.step_init)).model.eval()


def _validate_and_save(cfg: QuantizeConfig, c: _Calibrated, out: str | os.PathLike, command: str | None,
                       extra: dict[str, Any] | None = None) -> PTQResult:
    """Validate the finished quantized model and write ``out/model.safetensors`` (rank 0)."""

    c.model.eval()
    channels = int(getattr(c.model, "in_chans", 3))
    validate = make_validator(load_pairs(cfg.val_data, c.deg, channels, split="eval") if cfg.val_data else None,
                              c.deg, c.info)
    validation = validate(c.model) if validate else None
    if c.info.is_main:
        fields: dict[str, Any] = {"task": c.deg.as_dict(), "quantized_from": str(cfg.checkpoint), **(extra or {})}
        if validation:
            fields["validation"] = {"data": cfg.val_data, **validation}
        provenance = {"trained_by": JOB, "command": command, "config": cfg.as_dict(),
                      "calibration_batches": cfg.calib_batches, "train_images": [p.name for p in c.sampler.pairs]}
        save_checkpoint(c.model.cpu(), RunFolder(out).root / "model.safetensors", provenance=provenance,
                        extra=fields)
    return PTQResult(c.model, validation, time.perf_counter() - c.t0)


def _quantize_ptq(cfg: QuantizeConfig, out: str | os.PathLike, command: str | None) -> PTQResult:
    return _validate_and_save(cfg, _calibrated(cfg), out, command)


def quantize(cfg: QuantizeConfig, out: str | os.PathLike, command: str | None = None,
             progress: bool = True) -> FitResult | PTQResult:
    """The ``qmamba-deploy quantize`` job; writes ``out/model.safetensors``."""
    if not cfg.checkpoint or not Path(cfg.checkpoint).is_file():
        raise OptionError(f"--checkpoint {cfg.checkpoint or '(none)'} is not a file; pass the float checkpoint")
    check_run_folder(cfg, out)
    if isinstance(cfg, SPR2QConfig):
        return quantize_spr2q(cfg, out, command, progress)
    if cfg.qconfig().recipe.qat:
        return run_job(cfg, out, _qat_job, JOB, command, progress=progress)
    return _quantize_ptq(cfg, out, command)


# ------------------------------------------------------------------------------ SPR²Q


@dataclass
class SPR2QConfig(QuantizeConfig):
    """SPR²Q settings on top of :class:`QuantizeConfig` (``iters`` = group-training iterations)."""

    method: str = "spr2q"
    rank: int = 8
    group_size: int = 4
    route_iters: int = 100
    feature_weight: float = 1.0  # λ of the block feature-alignment term
    # group | single (one rectifier, PQFR) | plain (calibrated Q_{a,b} only) | bounds (Q_{a,b} bounds trained
    # with the same budget and loss, no rectifier) | no-static (ĝ = the gate's calibration mean, not optimised)
    variant: str = "group"
    bounds_init: str = "mse"  # Q_{a,b} bounds from the first calibration batch: mse | minmax (BOUND_INITS)

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in SPR2Q_VARIANTS:
            raise OptionError(f"--spr2q-variant {self.variant!r} is unknown; use {', '.join(SPR2Q_VARIANTS)}")
        if self.bounds_init not in BOUND_INITS:
            raise OptionError(f"--bounds-init {self.bounds_init!r} is unknown; use {' or '.join(BOUND_INITS)}")
        if self.rank < 1 or self.group_size < 1:
            raise OptionError("--rank and --group-size must be at least 1")


def _adam_loop(student, teacher, params, batches, iters: int, lr: float, lam: float, device, log) -> list[float]:
    opt = adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1))
    losses = []
    for it in range(iters):
        loss = hybrid_loss(student, teacher, batches(it).to(device), lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        log(it, losses[-1])
    return losses


def quantize_spr2q(cfg: SPR2QConfig, out: str | os.PathLike, command: str | None = None,
                   progress: bool = True) -> PTQResult:
    """SPR²Q: calibrate Q_{a,b} -> train rectifier groups -> static routing -> fuse -> save.

    Writes ``out/model.safetensors`` (an ordinary quantized checkpoint, qconfig
    ``spr2q``), ``out/routing.json`` (ĝ and the increment norm per layer) and
    ``out/log.jsonl``. One process; the float weights stay frozen.
    """

    c = _calibrated(cfg, prepare=lambda m: set_bounds_init(m, cfg.bounds_init))
    model, teacher, sampler, info = c.model, c.teacher, c.sampler, c.info
    folder = RunFolder(out)
    folder.root.mkdir(parents=True, exist_ok=True)
    if folder.log.exists():
        folder.log.unlink()

    def batches(it: int) -> torch.Tensor:
        return sampler.batch(it, 0)[0]

    def log(stage: str):
        def write(it: int, loss: float) -> None:
            if (it + 1) % cfg.log_every == 0:
                folder.append_log({"stage": stage, "iter": it + 1, "loss": loss})
        return write

    table: dict[str, Any] = {}
    torch.manual_seed(cfg.seed)
    if cfg.variant == "bounds":
        model.eval()
        bounds = [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]
        with routing_mode(model, "deterministic"), routing_mode(teacher, "deterministic"):
            _adam_loop(model, teacher, bounds, batches, cfg.iters, cfg.lr, cfg.feature_weight, info.device,
                       log("bounds"))
    elif cfg.variant != "plain":
        n = 1 if cfg.variant == "single" else cfg.group_size
        attach_rectifiers(model, n=n, rank=cfg.rank)
        model.eval()  # the float weights are frozen and the quantizers initialised: no dropout / drop path
        group_params = [p for name, p in model.named_parameters() if p.requires_grad]
        with routing_mode(model, "deterministic"), routing_mode(teacher, "deterministic"):
            _adam_loop(model, teacher, group_params, batches, cfg.iters, cfg.lr, cfg.feature_weight, info.device,
                       log("group"))
            mean_gates = _mean_gates(model, [batches(cfg.iters + cfg.calib_batches + i)
                                             for i in range(cfg.calib_batches)], info.device)
            route_statically(model, mean_gates)
            if cfg.variant == "group" and n > 1 and cfg.route_iters:
                for p in model.parameters():
                    p.requires_grad_(False)
                g_params = [m.rectifier.g_static for _, m in rectified_layers(model)]
                for p in g_params:
                    p.requires_grad_(True)
                _adam_loop(model, teacher, g_params, lambda it: batches(cfg.iters + 1000 + it), cfg.route_iters,
                           cfg.lr, cfg.feature_weight, info.device, log("routing"))
        table = fuse_rectifiers(model)
    if table:
        write_json(folder.root / "routing.json", {"layers": table})
    spr2q = {"variant": cfg.variant, "rank": cfg.rank, "group_size": cfg.group_size, "bounds_init": cfg.bounds_init,
             "routing_table": "routing.json" if table else None}
    return _validate_and_save(cfg, c, out, command, {"spr2q": spr2q})


@torch.no_grad()
def _mean_gates(model: nn.Module, xs: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Each layer's gate weights averaged over calibration batches (the start of static routing)."""

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in rectified_layers(model):
        def pre(mod, args, name=name):
            g = mod.rectifier.gates(args[0], mod.CHANNEL_DIM).mean(0)
            sums[name] = sums.get(name, 0) + g

        hooks.append(m.register_forward_pre_hook(pre))
    try:
        for x in xs:
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {k: v / len(xs) for k, v in sums.items()}
