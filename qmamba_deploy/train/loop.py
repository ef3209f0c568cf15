"""The training loop (:func:`fit`), shared by restoration training and QAT.

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

import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .dist import DistInfo, barrier, gather_digests
from .folder import RunFolder, load_state, save_state
from .losses import EMA, Schedule


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


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Adam as every training loop here builds it: torch's fused implementation where the parameters
    live on a device it supports (CPU, CUDA), one kernel over all parameters instead of a Python loop
    per parameter. A quantized model has thousands of scalar quantizer parameters: on the W4A4
    Q-MambaIR step the per-parameter loop took 0.27 s, the fused one 0.07 s (docs/performance.md)."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.Adam(groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]

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
    opt = (optimizer or (lambda groups: adam(groups, lr=2e-4, betas=(0.9, 0.99))))(param_groups)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    ema = EMA(model, cfg.ema) if cfg.ema else None

    start, resumed = 0, None
    if folder.last_checkpoint() is not None:
        start = resumed = load_state(folder, model, opt, ema)
        if info.is_main:
            folder.truncate_log(start)
    barrier(info)
    net: nn.Module = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ship = ema.model if ema else model

    bar = None
    if info.is_main and cfg.progress and start < cfg.iters:
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
                save_state(folder, it, model, opt, ema, ship)
    except KeyboardInterrupt:
        # an interrupted step never reached opt.step(); save what is complete and stop
        if info.is_main and it > start and (folder.last_checkpoint() or {}).get("iteration") != it:
            save_state(folder, it, model, opt, ema, ship)
            print(f"\ninterrupted: saved iteration {it} to {folder.root}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    if validate is not None and info.is_main and validation is None:
        validation = validate(ship)  # a rerun of a finished run still reports its validation
    digests = gather_digests(ship, info)
    if info.is_main and len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights ({digests}); DistributedDataParallel lost sync")
    barrier(info)
    return FitResult(ship, it, resumed, validation, digests, time.perf_counter() - t0)
