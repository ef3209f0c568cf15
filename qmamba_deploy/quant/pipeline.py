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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OptionError
from ..train import (DistInfo, FitResult, Job, RunFolder, TrainConfig, _routing, init_distributed, make_validator,
                     run_job)
from . import calibrating
from .qconfig import QConfig, quantize_model
from .quantizers import Quantizer

JOB = "qmamba-deploy quantize"


@dataclass
class QuantizeConfig(TrainConfig):
    checkpoint: str = ""  # the float model
    method: str = "qmambair"
    w_bits: int = 4
    a_bits: int = 4
    scan_bits: int | None = None
    distill: float = 0.0  # weight of L1(student, teacher) in the QAT loss
    calib_batches: int = 4
    quant_lr: float | None = None  # learning rate of quantizer parameters (default: lr)

    def qconfig(self) -> QConfig:
        return QConfig(self.method, self.w_bits, self.a_bits, self.scan_bits)

    def __post_init__(self):
        self.qconfig()  # validates method and bit widths
        if not 0 <= self.distill <= 1:
            raise OptionError(f"--distill {self.distill} must be in [0, 1] (weight of the teacher term)")
        if self.calib_batches < 1:
            raise OptionError("--calib-batches must be at least 1")


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> int:
    """Run ``batches`` through ``model`` with its quantizers in calibration mode; returns the count."""
    n = 0
    with torch.no_grad(), calibrating(model), _routing(model, "deterministic"):
        for x in batches:
            model(x.to(device))
            n += 1
    return n


def _calibration_batches(cfg: QuantizeConfig, sampler) -> Iterable[torch.Tensor]:
    # iterations beyond the training range: calibration never reuses a training batch
    return (sampler.batch(cfg.iters + i, 0)[0] for i in range(cfg.calib_batches))


def _load_float(cfg: QuantizeConfig) -> nn.Module:
    from ..checkpoints import load_model

    fp = load_model(cfg.checkpoint)
    if getattr(fp, "qconfig", None) is not None:
        raise OptionError(f"{cfg.checkpoint} is already quantized ({fp.qconfig.label}); pass the float checkpoint")
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
    lam = cfg.distill

    def prepare(sampler) -> None:
        calibrate(model, _calibration_batches(cfg, sampler), info.device)

    def loss(pred: torch.Tensor, target) -> torch.Tensor:
        if lam == 0:
            return F.l1_loss(pred, target)
        gt, teacher = target
        return (1 - lam) * F.l1_loss(pred, gt) + lam * F.l1_loss(pred, teacher)

    def batches(sampler):
        if lam == 0:
            return sampler.batch

        def with_teacher(it: int, rank: int):
            x, gt = sampler.batch(it, rank)
            with torch.no_grad(), _routing(fp, "deterministic"):
                teacher = fp(x.to(info.device)).cpu()
            return x, (gt, teacher)

        return with_teacher

    return Job(model, loss, _param_groups(model, cfg), manifest={"quantized_from": str(cfg.checkpoint)},
               prepare=prepare, batches=batches)


@dataclass
class PTQResult:
    model: nn.Module
    validation: dict[str, Any] | None
    seconds: float


def _quantize_ptq(cfg: QuantizeConfig, out: str | os.PathLike, command: str | None) -> PTQResult:
    from ..checkpoints import save_checkpoint
    from ..data.datasets import PatchSampler, load_pairs

    t0 = time.perf_counter()
    info = init_distributed(cfg.device)
    deg = cfg.degradation()
    model = quantize_model(copy.deepcopy(_load_float(cfg)), cfg.qconfig()).to(info.device)
    channels = int(getattr(model, "in_chans", 3))
    sampler = PatchSampler(load_pairs(cfg.data, deg, channels, split="train"), deg, cfg.patch, cfg.batch,
                           seed=cfg.seed)
    calibrate(model, _calibration_batches(cfg, sampler), info.device)
    validate = make_validator(load_pairs(cfg.val_data, deg, channels, split="eval") if cfg.val_data else None,
                              deg, info)
    validation = validate(model) if validate else None
    if info.is_main:
        folder = RunFolder(out)
        extra: dict[str, Any] = {"task": deg.as_dict(), "quantized_from": str(cfg.checkpoint)}
        if validation:
            extra["validation"] = {"data": cfg.val_data, **validation}
        provenance = {"trained_by": JOB, "command": command, "config": cfg.as_dict(),
                      "calibration_batches": cfg.calib_batches, "train_images": [p.name for p in sampler.pairs]}
        save_checkpoint(model.cpu(), folder.root / "model.safetensors", provenance=provenance, extra=extra)
    return PTQResult(model, validation, time.perf_counter() - t0)


def quantize(cfg: QuantizeConfig, out: str | os.PathLike, command: str | None = None,
             progress: bool = True) -> FitResult | PTQResult:
    """The ``qmamba-deploy quantize`` job; writes ``out/model.safetensors``."""
    if not cfg.checkpoint or not Path(cfg.checkpoint).is_file():
        raise OptionError(f"--checkpoint {cfg.checkpoint or '(none)'} is not a file; pass the float checkpoint")
    if cfg.qconfig().recipe.qat:
        return run_job(cfg, out, _qat_job, JOB, command, progress=progress)
    return _quantize_ptq(cfg, out, command)
