"""`qmamba-deploy sensitivity`: what each layer group costs when quantized, and a precision policy.

For a float checkpoint and one PTQ setting (method, bits, granularity) every layer group of the
placement (``quant.qconfig.layer_groups``: the same layer in every block, or every layer of one
residual group) is measured twice on the eval images, each time with a fresh PTQ model calibrated
on the same training patches:

* **alone**: only that group quantized, everything else float -> the PSNR it loses by itself;
* **kept**: everything quantized except that group -> the PSNR keeping it in float buys back.

The **recommended policy** promotes groups to ``promote_bits`` (8: still integer, so the engine
stays INT8/INT4 end to end) in the order of what keeping them buys per weight, while the promoted
weights stay within ``budget`` of the quantized weights; it is then measured like the others. It
is written as a policy file (``policy`` in the JSON) that ``quantize --policy FILE`` reads; the
papers' placement is the policy named ``paper`` (no change).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..artifacts import is_kind, kind
from ..checkpoints import load_model
from ..data.datasets import PatchStream, load_pairs
from ..data.degrade import degradation_for
from ..errors import OptionError
from ..evaluate import evaluate_model
from ..models.routing import routing_mode
from ..quant.qconfig import GROUPINGS, PTQ_METHODS, QConfig, group_patterns, layer_groups, quantize_model
from .quantize import calibrate

POLICY_KIND = kind("precision policy")


@dataclass
class SensitivityConfig:
    checkpoint: str
    method: str = "mse"
    w_bits: int = 4
    a_bits: int = 4
    w_granularity: str = "tensor"
    by: str = "kind"
    data: str = "builtin"
    val_data: str = "builtin"
    calib_batches: int = 4
    patch: int = 48
    batch: int = 4
    seed: int = 0
    budget: float = 0.10  # share of the quantized weights the policy may promote
    promote_bits: int = 8
    device: str = "cpu"

    def __post_init__(self):
        if self.method not in PTQ_METHODS:
            raise OptionError(f"--method {self.method!r}: sensitivity measures PTQ models; use one of "
                              f"{', '.join(PTQ_METHODS)}")
        if self.by not in GROUPINGS:
            raise OptionError(f"--by {self.by!r} is unknown; use {' or '.join(GROUPINGS)}")
        if not 0 <= self.budget <= 1:
            raise OptionError(f"--budget {self.budget} must be a share of the weights in [0, 1]")
        self.qconfig()  # bit widths and granularity checked once, by QConfig

    def qconfig(self, keep_fp: tuple[str, ...] = (), overrides: tuple = ()) -> QConfig:
        return QConfig(self.method, self.w_bits, self.a_bits, keep_fp=keep_fp, overrides=overrides,
                       w_granularity=self.w_granularity)


#: the settings a report's groups were measured with: `sensitivity --from` keeps them (the rest it may change)
MEASUREMENT_SETTINGS = tuple(f.name for f in fields(SensitivityConfig)
                             if f.name not in ("checkpoint", "budget", "promote_bits", "device"))


@dataclass
class GroupScore:
    group: str              # fnmatch pattern(s), '|'-joined
    modules: int
    weights: int            # parameters of the group's modules
    psnr_alone: float       # only this group quantized
    psnr_kept: float        # everything quantized except this group

    def as_dict(self, fp: float, quantized: float) -> dict[str, Any]:
        return {**asdict(self), "drop_alone_db": fp - self.psnr_alone, "gain_kept_db": self.psnr_kept - quantized}


@dataclass
class SensitivityReport:
    config: SensitivityConfig
    psnr_fp: float
    psnr_quantized: float
    groups: list[GroupScore]
    policy: dict[str, Any]
    psnr_policy: float
    seconds: float
    images: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": kind("sensitivity report"), "config": asdict(self.config), "images": self.images,
                "psnr_fp": self.psnr_fp, "psnr_quantized": self.psnr_quantized, "psnr_policy": self.psnr_policy,
                "groups": [g.as_dict(self.psnr_fp, self.psnr_quantized) for g in self.groups],
                "policy": self.policy, "seconds": self.seconds}

    def table(self) -> str:
        c = self.config
        label = f"{c.method} W{c.w_bits}A{c.a_bits}" + (" per-channel" if c.w_granularity == "channel" else "")
        lines = [f"{label}: FP32 {self.psnr_fp:.3f} dB, all quantized {self.psnr_quantized:.3f} dB "
                 f"({self.psnr_quantized - self.psnr_fp:+.3f}); mean Y-PSNR over {len(self.images)} eval images",
                 "",
                 "| layer group | modules | weights | only it quantized (dB) | all but it quantized (dB) |",
                 "|---|---:|---:|---:|---:|"]
        for g in sorted(self.groups, key=lambda g: g.psnr_kept - self.psnr_quantized, reverse=True):
            lines.append(f"| `{g.group}` | {g.modules} | {g.weights:,} | {g.psnr_alone - self.psnr_fp:+.3f} | "
                         f"{g.psnr_kept - self.psnr_quantized:+.3f} |")
        promoted = self.policy["overrides"]
        lines += ["", f"recommended policy: {len(promoted)} group(s) at W{c.promote_bits}A{c.promote_bits} "
                      f"({self.policy['promoted_share']:.1%} of the quantized weights): {self.psnr_policy:.3f} dB "
                      f"({self.psnr_policy - self.psnr_fp:+.3f} from FP32, "
                      f"{self.psnr_policy - self.psnr_quantized:+.3f} from all quantized)"]
        lines += [f"  --layer-bits '{o[0]}=W{o[1]}A{o[2]}'" for o in promoted]
        return "\n".join(lines)


def _weights(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def recommend(groups: list[GroupScore], quantized_psnr: float, total_weights: int, budget: float,
              bits: int) -> dict[str, Any]:
    """Promote groups in the order of dB bought back per weight (only groups that buy something),
    while the promoted weights stay within ``budget`` of all quantized weights."""
    ranked = sorted((g for g in groups if g.psnr_kept > quantized_psnr),
                    key=lambda g: (g.psnr_kept - quantized_psnr) / max(g.weights, 1), reverse=True)
    chosen, used = [], 0
    for g in ranked:
        if used + g.weights <= budget * total_weights:
            chosen.append(g)
            used += g.weights
    overrides = [[p, bits, bits] for g in chosen for p in group_patterns(g.group)]
    return {"kind": POLICY_KIND, "name": "recommended", "keep_fp": [], "overrides": overrides,
            "promoted_share": used / max(total_weights, 1),
            "rule": f"groups in the order of dB bought back per weight, promoted weights <= {budget:.0%}"}


class _Bench:
    """What every measurement of one report shares: the float model, the calibration patches, the eval images."""

    def __init__(self, cfg: SensitivityConfig):
        self.cfg = cfg
        self.fp = load_model(cfg.checkpoint).eval().to(cfg.device)
        if self.fp.card.qconfig is not None:
            raise OptionError(f"{cfg.checkpoint} is already quantized ({self.fp.card.qconfig.label}); pass the float "
                              f"checkpoint")
        self.deg = degradation_for(int(getattr(self.fp, "upscale", 1)), self.fp.card.task)
        channels = int(getattr(self.fp, "in_chans", 3))
        sampler = PatchStream(cfg.data, cfg.patch, cfg.batch, cfg.seed).sampler(self.deg, channels)
        self.batches = [sampler.batch(i, 0)[0] for i in range(cfg.calib_batches)]
        self.pairs = load_pairs(cfg.val_data, self.deg, channels, split="eval")

    def psnr(self, model: nn.Module) -> float:
        with routing_mode(model, "deterministic"):
            return evaluate_model(model, self.pairs, self.deg, device=self.cfg.device).mean("psnr")

    def measured(self, qconfig: QConfig) -> float:
        q = quantize_model(copy.deepcopy(self.fp), qconfig).to(self.cfg.device)
        calibrate(q, self.batches, self.cfg.device)
        return self.psnr(q.eval())


def _policy(cfg: SensitivityConfig, scores: list[GroupScore], psnr_q: float, total_weights: int,
            bench: _Bench) -> tuple[dict[str, Any], float]:
    """The recommended policy of ``scores`` within ``cfg.budget``, and its measured PSNR."""
    policy = recommend(scores, psnr_q, total_weights, cfg.budget, cfg.promote_bits)
    policy["source"] = {"checkpoint": str(cfg.checkpoint), "method": cfg.method, "w_bits": cfg.w_bits,
                        "a_bits": cfg.a_bits, "by": cfg.by}
    overrides = tuple(tuple(o) for o in policy["overrides"])
    return policy, bench.measured(cfg.qconfig(overrides=overrides)) if overrides else psnr_q


def sensitivity(cfg: SensitivityConfig, progress: bool = True) -> SensitivityReport:
    """Measure every layer group (alone / kept) and the recommended policy; see the module docstring."""
    t0 = time.perf_counter()
    bench = _Bench(cfg)
    groups = layer_groups(bench.fp, cfg.by)
    names = [n for members in groups.values() for n in members]
    say = print if progress else (lambda *_: None)
    psnr_fp = bench.psnr(bench.fp)
    psnr_q = bench.measured(cfg.qconfig())
    say(f"FP32 {psnr_fp:.3f} dB, all quantized {psnr_q:.3f} dB; {len(groups)} groups")
    scores = []
    for key, members in groups.items():
        others = tuple(n for n in names if n not in members)
        alone = bench.measured(cfg.qconfig(keep_fp=others))
        kept = bench.measured(cfg.qconfig(keep_fp=group_patterns(key)))
        scores.append(GroupScore(key, len(members), _weights(bench.fp, members), alone, kept))
        say(f"  {key[:70]}: alone {alone - psnr_fp:+.3f} dB, kept in float {kept - psnr_q:+.3f} dB")
    policy, psnr_policy = _policy(cfg, scores, psnr_q, _weights(bench.fp, names), bench)
    return SensitivityReport(cfg, psnr_fp, psnr_q, scores, policy, psnr_policy, time.perf_counter() - t0,
                             [p.name for p in bench.pairs])


def rebudget(report: str | Path, budget: float, promote_bits: int | None = None, checkpoint: str | None = None,
             device: str | None = None) -> SensitivityReport:
    """The recommended policy at another ``budget`` (and ``promote_bits``) from an earlier report's measured
    groups: no group is measured again (minutes instead of a quarter of an hour); the new policy is. The
    report's own settings (method, bits, calibration) are kept; ``checkpoint`` replaces its path."""
    t0 = time.perf_counter()
    try:
        data = json.loads(Path(report).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"--from {report}: not a readable JSON file ({exc})") from None
    legacy = "qmamba-deploy/sensitivity"  # what reports said before artifacts.kind (docs' committed one)
    found = data.get("kind") if isinstance(data, dict) else None
    if not (is_kind(found, "sensitivity report") or found == legacy):
        raise OptionError(f"--from {report}: not a sensitivity report (write one with qmamba-deploy sensitivity "
                          f"--json)")
    try:
        settings = {**data["config"], "budget": budget}
        if promote_bits is not None:
            settings["promote_bits"] = promote_bits
        if checkpoint is not None:
            settings["checkpoint"] = checkpoint
        if device is not None:
            settings["device"] = device
        cfg = SensitivityConfig(**settings)
        scores = [GroupScore(g["group"], int(g["modules"]), int(g["weights"]), float(g["psnr_alone"]),
                             float(g["psnr_kept"])) for g in data["groups"]]
        psnr_fp, psnr_q = float(data["psnr_fp"]), float(data["psnr_quantized"])
    except OptionError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"--from {report}: a malformed sensitivity report ({type(exc).__name__}: {exc}); measure "
                          f"it again") from None
    if not Path(cfg.checkpoint).is_file():
        raise OptionError(f"--from {report}: its checkpoint {cfg.checkpoint} is not a file here; pass the float "
                          f"checkpoint as CHECKPOINT")
    bench = _Bench(cfg)
    policy, psnr_policy = _policy(cfg, scores, psnr_q, sum(g.weights for g in scores), bench)
    return SensitivityReport(cfg, psnr_fp, psnr_q, scores, policy, psnr_policy, time.perf_counter() - t0,
                             list(data.get("images", [])))


# ------------------------------------------------------------------------------ policies
#: Named policies: ``paper`` is the papers' placement as it is (their rows stay reproducible).
POLICIES: dict[str, dict[str, Any]] = {
    "paper": {"kind": POLICY_KIND, "name": "paper", "keep_fp": [], "overrides": []},
}


def read_policy(value: str) -> dict[str, Any]:
    """``--policy NAME`` or ``--policy FILE.json`` (what `sensitivity --json` wrote, or its ``policy``)."""
    if value in POLICIES:
        return POLICIES[value]
    path = Path(value)
    if not path.is_file():
        raise OptionError(f"--policy {value!r} is neither a policy name ({', '.join(POLICIES)}) nor a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"--policy {value}: not a JSON file ({exc})") from None
    policy = data.get("policy", data) if isinstance(data, dict) else None
    if not isinstance(policy, dict) or not is_kind(policy.get("kind"), "precision policy"):
        raise OptionError(f"--policy {value}: not a precision policy (write one with qmamba-deploy sensitivity "
                          f"--json)")
    keep, over = policy.get("keep_fp", []), policy.get("overrides", [])
    ok = (isinstance(keep, list) and all(isinstance(p, str) for p in keep) and isinstance(over, list)
          and all(isinstance(o, list) and len(o) == 3 and isinstance(o[0], str)
                  and all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in o[1:])
                  for o in over))
    if not ok:
        raise OptionError(f"--policy {value}: keep_fp must be a list of patterns and overrides a list of "
                          f"[pattern, w_bits, a_bits] with bits in 2..8")
    return policy
