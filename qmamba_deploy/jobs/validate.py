"""Validate: the same images through PyTorch and through the exported graphs, side by side.

Every *output* (a float NCHW -> float NCHW function: a torch model, an ONNX Runtime
session) is scored against the ground truth (Y-PSNR / SSIM, BasicSR conventions).
Every *candidate* output is also compared with its *reference* output on the same input:
max and mean absolute difference and the PSNR between the two (on the float outputs
clipped to [0, 1]). The report fails when a candidate's PSNR-between on some image is
below what is required (or its max difference above ``max_abs``, when set).

What is required: ``min_psnr_between`` (50 dB by default), unless the reference model
itself is more sensitive than that. A low-bit network is discontinuous — every rounding
in a quantizer, and MambaIRv2's argmax routing, can flip when a sum is rounded
differently — so two float32 runtimes that add in a different order cannot agree better
than the model agrees with a more exact computation of itself. A reference that has an
``exact`` runner (the same model in float64) is therefore run both ways on every image;
the PSNR between the float32 and float64 outputs is its *sensitivity floor*, and a
candidate must reach min(``min_psnr_between``, floor − ``SENSITIVITY_MARGIN_DB``). Both
numbers are reported.

Agreement alone cannot tell a subtly broken export from a chaotic but healthy low-bit model, so
each candidate's quality against the ground truth is also compared with its reference's on the
same images: a broken export loses quality, a sensitive model only disagrees. A candidate whose
mean Y-PSNR falls more than ``quality_margin_db`` (0.1 dB by default) below its reference's fails
even when it agrees well enough, and every candidate gets a diagnosis: *agrees*, *sensitive* (it
disagrees beyond the rule but keeps the reference's quality: rounding chaos, see the floor) or
*quality lost*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..artifacts import sha256_file
from ..data.datasets import Pair, degrade_pair, load_pairs, to_tensor
from ..data.degrade import Degradation, model_degradation
from ..errors import OptionError
from ..evaluate import score_image, to_uint8_image
from ..export.graph import read_onnx
from ..fold import load_bundle, with_dls_mode
from ..metrics import psnr_between
from ..runtime import Runner, ShapeLimits, TorchRunner, artifact_kind, open_runner
from ..runtime.ort import read_onnx_manifest
from ..runtime.tensorrt import read_engine_manifest
from ..runtime.tiling import tiled_run
from .diagnose import DiagnoseReport, diagnose

RunFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_MIN_PSNR_BETWEEN = 50.0
#: How far below the reference's own one-ulp sensitivity a candidate may fall.
SENSITIVITY_MARGIN_DB = 6.0
#: How much mean Y-PSNR (vs ground truth) a candidate may lose against its reference.
DEFAULT_QUALITY_MARGIN_DB = 0.1

__all__ = ["Output", "OutputResult", "ValidationReport", "validate_outputs", "psnr_between",
           "DEFAULT_MIN_PSNR_BETWEEN", "DEFAULT_QUALITY_MARGIN_DB", "validate_artifacts", "reference_outputs",
           "candidate", "Candidate"]


@dataclass
class Output:
    """One thing to run: ``reference`` names the output it must agree with (None: a reference)."""

    name: str
    run: RunFn
    reference: str | None = None
    path: str | None = None
    exact: RunFn | None = None  # the same computation in float64 (references): gives the floor


@dataclass
class OutputResult:
    name: str
    reference: str | None
    path: str | None
    images: list[dict[str, Any]] = field(default_factory=list)
    passed: bool | None = None
    diagnosis: str | None = None  # candidates: agrees | sensitive | quality lost

    def mean(self, key: str) -> float:
        return float(np.mean([im[key] for im in self.images]))

    @property
    def min_psnr_between(self) -> float | None:
        return min(im["psnr_between"] for im in self.images) if self.reference else None

    @property
    def max_abs(self) -> float | None:
        return max(im["max_abs"] for im in self.images) if self.reference else None

    @property
    def min_floor(self) -> float | None:
        """The lowest float32-vs-float64 sensitivity floor (references with an exact runner)."""
        floors = [im["sensitivity_floor"] for im in self.images if "sensitivity_floor" in im]
        return min(floors) if floors else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"psnr": self.mean("psnr"), "ssim": self.mean("ssim")}
        if self.reference:
            out.update(min_psnr_between=_json_float(self.min_psnr_between), max_abs=self.max_abs,
                       mean_abs=self.mean("mean_abs"), psnr_vs_reference=self.mean("psnr_vs_reference"),
                       ssim_vs_reference=self.mean("ssim_vs_reference"))
        elif self.min_floor is not None:
            out["min_sensitivity_floor"] = _json_float(self.min_floor)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reference": self.reference, "path": self.path, "passed": self.passed,
                "diagnosis": self.diagnosis, "mean": self.summary(),
                "images": [{k: _json_float(v) for k, v in im.items()} for im in self.images]}


def _json_float(v):
    return "inf" if isinstance(v, float) and math.isinf(v) else v


@dataclass
class ValidationReport:
    degradation: Degradation
    outputs: list[OutputResult]
    min_psnr_between: float
    max_abs: float | None
    baseline: dict[str, float]
    quality_margin_db: float = DEFAULT_QUALITY_MARGIN_DB
    diagnosis: DiagnoseReport | None = None  # --diagnose: code and routing flips of the reference

    @property
    def passed(self) -> bool:
        return all(o.passed is not False for o in self.outputs)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "degradation": self.degradation.as_dict(),
                "thresholds": {"min_psnr_between_db": self.min_psnr_between, "max_abs": self.max_abs,
                               "sensitivity_margin_db": SENSITIVITY_MARGIN_DB,
                               "quality_margin_db": self.quality_margin_db,
                               "rule": "PSNR-between >= min(min_psnr_between_db, the reference's float32-vs-"
                                       "float64 sensitivity floor - sensitivity_margin_db) on every image, and "
                                       "mean Y-PSNR vs ground truth >= the reference's - quality_margin_db"},
                "metric": "Y-PSNR/SSIM vs ground truth (BT.601, BasicSR conventions); PSNR-between on float "
                          "outputs clipped to [0, 1]",
                "baseline": self.baseline, "outputs": [o.as_dict() for o in self.outputs],
                **({"diagnosis": self.diagnosis.as_dict()} if self.diagnosis else {})}

    def table(self) -> str:
        head = (f"{'output':<36} {'Y-PSNR':>8} {'SSIM':>7} {'vs':<24} {'min PSNR-btw':>12} {'max |Δ|':>9} "
                f"{'mean |Δ|':>9} {'ΔY-PSNR':>8} {'':>4}")
        rows = [head, "-" * len(head)]
        for o in self.outputs:
            s = o.summary()
            if o.reference:
                mp = o.min_psnr_between
                mp_text = "identical" if math.isinf(mp) else f"{mp:.2f} dB"
                cmp = (f"{o.reference[:24]:<24} {mp_text:>12} {s['max_abs']:9.2e} {s['mean_abs']:9.2e} "
                       f"{s['psnr_vs_reference']:+8.3f}")
                verdict = ("ok" if o.passed else "FAIL") + ("" if o.diagnosis == "agrees" else f" ({o.diagnosis})")
            else:
                floor = o.min_floor
                note = "" if floor is None else ("(floor: identical)" if math.isinf(floor)
                                                 else f"(floor {floor:.2f} dB)")
                cmp, verdict = f"{'(reference)':<24} {note:>12} {'':>9} {'':>9} {'':>8}", ""
            rows.append(f"{o.name[:36]:<36} {s['psnr']:8.4f} {s['ssim']:7.4f} {cmp} {verdict:>4}")
        rows.append(f"{self.degradation.baseline_name + ' (baseline)':<36} {self.baseline['psnr']:8.4f} "
                    f"{self.baseline['ssim']:7.4f}")
        rows.append(f"floor: PSNR between a reference run in float32 and in float64; a candidate needs "
                    f"min({self.min_psnr_between:g} dB, floor - {SENSITIVITY_MARGIN_DB:g} dB) on every image, and "
                    f"a mean Y-PSNR at most {self.quality_margin_db:g} dB below its reference's (ΔY-PSNR); "
                    f"'sensitive': disagrees beyond that rule without losing quality")
        if self.diagnosis:
            rows += ["", self.diagnosis.table()]
        return "\n".join(rows)


def validate_outputs(outputs: list[Output], pairs: Iterable[Pair], degradation: Degradation,
                     min_psnr_between: float = DEFAULT_MIN_PSNR_BETWEEN, max_abs: float | None = None,
                     seed: int = 0, progress: bool = False,
                     quality_margin_db: float = DEFAULT_QUALITY_MARGIN_DB) -> ValidationReport:
    """Run every output on every pair; compare candidates with their references."""
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise ValueError(f"output names must be unique: {names}")
    for o in outputs:
        if o.reference is not None and o.reference not in names:
            raise ValueError(f"{o.name}: reference {o.reference!r} is not one of the outputs")
    results = {o.name: OutputResult(o.name, o.reference, o.path) for o in outputs}

    base_psnr, base_ssim = [], []
    pairs = list(pairs)
    if progress:
        pairs = tqdm(pairs, desc="validate", unit="img", leave=False)
    for pair in pairs:
        lq = degrade_pair(pair, degradation, seed)
        x = to_tensor(lq)
        ys = {}
        floors = {}
        for o in outputs:
            with torch.no_grad():
                ys[o.name] = o.run(x).float().cpu()
                if o.exact is not None:
                    floors[o.name] = psnr_between(ys[o.name], o.exact(x.double()).float().cpu())
            if ys[o.name].shape[-2:] != pair.gt.shape[:2]:
                raise ValueError(f"{o.name} returned {tuple(ys[o.name].shape)} for the {pair.gt.shape[1]}x"
                                 f"{pair.gt.shape[0]} ground truth of {pair.name}")
        scores = {o.name: score_image(to_uint8_image(ys[o.name]), pair.gt, degradation.baseline(lq), pair.name,
                                      lq.shape[:2], degradation.crop_border) for o in outputs}
        for o in outputs:
            score = scores[o.name]
            entry: dict[str, Any] = {"image": pair.name, "psnr": score.psnr, "ssim": score.ssim}
            if o.name in floors:
                entry["sensitivity_floor"] = floors[o.name]
            if o.reference is not None:
                diff = (ys[o.name] - ys[o.reference]).abs()
                floor = floors.get(o.reference, math.inf)
                required = min(min_psnr_between, floor - SENSITIVITY_MARGIN_DB)
                ref = scores[o.reference]
                entry.update(max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                             psnr_between=psnr_between(ys[o.name], ys[o.reference]), required=required,
                             psnr_vs_reference=score.psnr - ref.psnr, ssim_vs_reference=score.ssim - ref.ssim)
            results[o.name].images.append(entry)
        base_psnr.append(score.psnr_baseline)
        base_ssim.append(score.ssim_baseline)
    for r in results.values():
        if r.reference is not None:
            agrees = (all(im["psnr_between"] >= im["required"] for im in r.images)
                      and (max_abs is None or r.max_abs <= max_abs))
            quality_kept = r.mean("psnr_vs_reference") >= -quality_margin_db
            r.passed = agrees and quality_kept
            r.diagnosis = "quality lost" if not quality_kept else ("agrees" if agrees else "sensitive")
    return ValidationReport(degradation, list(results.values()), min_psnr_between, max_abs,
                            {"psnr": float(np.mean(base_psnr)), "ssim": float(np.mean(base_ssim))},
                            quality_margin_db)


# ----------------------------------------------------------------------------- artifacts


def tiled(run: RunFn, scale: int, limits: ShapeLimits | None) -> RunFn:
    """``run`` over whole images, or over the tiles ``limits`` require (the same tiles for every
    output, so a reference and its candidate see the same pixels)."""
    if limits is None or (limits.min_hw == (1, 1) and limits.max_hw == (None, None) and not limits.max_batch):
        return run
    return lambda x: tiled_run(run, x, scale, limits=limits)


def reference_outputs(deploy: nn.Module, modes: Iterable[str], device: str = "cpu") -> list[Output]:
    """The deploy model in each DLS mode, as references (with their float64 twin for the floor)."""

    outputs = []
    for mode in dict.fromkeys(modes):
        runner = TorchRunner.from_module(with_dls_mode(deploy, mode), name=f"torch deploy ({mode} DLS)",
                                         device=device).open()
        outputs.append(Output(runner.name, runner, exact=runner.exact()))
    return outputs


def common_limits(runners: Iterable[Runner]) -> ShapeLimits | None:
    """The sizes every runner accepts (None: no runner has limits)."""
    out = None
    for r in runners:
        out = r.limits if out is None else out.narrowed(r.limits)
    return out


@dataclass
class Candidate:
    """An artifact to validate: its runner, the bundle it was made from and its DLS mode."""

    path: str
    kind: str
    bundle: str
    dls: str
    scan: str | None


def _recorded_source(path: Path, kind: str) -> dict[str, Any]:
    """bundle (absolute path), bundle_sha256, dls, scan as the artifact's manifest records them."""

    def text(d: Any, key: str, default: Any = None) -> Any:
        value = d.get(key, default) if isinstance(d, dict) else default
        if value is not None and not isinstance(value, str):
            raise OptionError(f"{path}: its manifest's {key!r} is not a string; the manifest is damaged: re-export "
                              f"the artifact or pass --bundle")
        return value

    if kind == "engine":
        m = read_engine_manifest(path)
        source = m.get("source")
        if isinstance(source, dict) and text(source, "bundle"):
            return {"bundle": text(source, "bundle"), "bundle_sha256": text(source, "bundle_sha256"),
                    "dls": text(source, "dls"), "scan": text(source, "scan")}
        # the ONNX it was built from: as engine.json records it, else beside it (trtexec in a Jetson package)
        onnx = [Path(p) for p in (text(m.get("onnx"), "path"), path.with_name("model.onnx")) if p]
        onnx = [p for p in onnx if p.is_file() and p.with_suffix(".json").is_file()]
        if not onnx:
            raise OptionError(f"{path}: neither an engine.json naming its bundle nor a model.onnx + model.json "
                              f"beside it; pass --bundle")
        path, kind = onnx[0], "onnx"
    m = read_onnx_manifest(path)
    if not m:
        raise OptionError(f"{path} has no {path.with_suffix('.json').name} beside it; validate needs the manifest "
                          f"that `export` writes (it names the bundle and the DLS mode), or pass --bundle")
    source, options = m.get("source"), m.get("options")
    bundle = text(source, "bundle", "bundle.safetensors")
    return {"bundle": str((path.parent / bundle).resolve()), "bundle_sha256": text(source, "bundle_sha256"),
            "dls": text(options, "dls", "static"), "scan": text(options, "scan")}


def candidate(path: str, bundle: str | None = None) -> Candidate:
    """What ``path`` (an ONNX or an engine) is validated against."""

    kind, target = artifact_kind(path)
    if kind not in ("onnx", "engine"):
        raise OptionError(f"{path} is a {kind}; validate compares exported graphs (.onnx) and engines with the "
                          f"PyTorch model of their bundle (for a {kind}'s quality, use `qmamba-deploy eval`)")
    if kind == "onnx":
        read_onnx(target)  # a file that is no graph is told so before its missing manifest
    try:
        source = _recorded_source(target, kind)
    except OptionError:
        if not bundle:
            raise
        source = {"dls": "static", "scan": None}
    if bundle:
        chosen = Path(bundle)
        chosen = chosen / "bundle.safetensors" if chosen.is_dir() else chosen
    else:
        chosen = Path(source["bundle"])
        if not chosen.is_file():
            raise OptionError(f"{path} was made from the bundle {chosen}, which is not there; pass --bundle")
        want = source.get("bundle_sha256")
        if want and sha256_file(chosen) != want:
            raise OptionError(f"{chosen} changed since {path} was made from it (its sha256 differs from the "
                              f"manifest's); re-export, or pass --bundle to compare with it anyway")
    dls = source.get("dls") or "static"
    if dls not in ("static", "dynamic"):
        raise OptionError(f"{path}: its manifest's DLS mode {dls!r} is neither static nor dynamic; re-export it")
    return Candidate(str(target), kind, str(chosen.resolve()), dls, source.get("scan"))


def validate_artifacts(paths: list[str], bundle: str | None = None, data: str = "builtin",
                       min_psnr_between: float = DEFAULT_MIN_PSNR_BETWEEN, max_abs: float | None = None,
                       device: str | None = None, plugin: str | None = None, tensorrt: str | None = None,
                       progress: bool = False, quality_margin_db: float = DEFAULT_QUALITY_MARGIN_DB,
                       diagnose_flips: bool = False) -> ValidationReport:
    """``qmamba-deploy validate``: ONNX graphs (ONNX Runtime) and engines (TensorRT) against the
    PyTorch deploy model of their bundle (on CUDA when a candidate is an engine and a GPU is here)."""

    cands = [candidate(p, bundle) for p in paths]
    bundles = {c.bundle for c in cands}
    if len(bundles) != 1:
        raise OptionError(f"the artifacts come from different bundles ({', '.join(sorted(bundles))}); validate them "
                          f"one bundle at a time, or pass --bundle")
    deploy = load_bundle(bundles.pop())
    on_gpu = any(c.kind == "engine" for c in cands) and torch.cuda.is_available()
    ref_device = device or ("cuda" if on_gpu else "cpu")
    runners = []
    for c in cands:
        options = {"plugin": plugin, "tensorrt": tensorrt} if c.kind == "engine" else {}
        cand_device = device or ("cuda" if c.kind == "engine" else "cpu")
        runners.append(open_runner(c.path, device=cand_device, **options).open())
    try:
        limits = common_limits(runners)
        scale = int(getattr(deploy, "upscale", 1))
        outputs = []
        for ref in reference_outputs(deploy, [c.dls for c in cands], ref_device):
            outputs.append(Output(ref.name, tiled(ref.run, scale, limits), exact=tiled(ref.exact, scale, limits)))
        names = set()
        for c, r in zip(cands, runners):
            name = f"{r.kind}: {Path(c.path).name}" + (f" ({c.scan})" if c.scan else "")
            name = name if name not in names else f"{name} [{c.path}]"
            names.add(name)
            outputs.append(Output(name, tiled(r.run, scale, limits), reference=f"torch deploy ({c.dls} DLS)",
                                  path=c.path))
        deg = model_degradation(deploy)
        pairs = load_pairs(data, deg, int(getattr(deploy, "in_chans", 3)), split="eval")
        report = validate_outputs(outputs, pairs, deg, min_psnr_between, max_abs, progress=progress,
                                  quality_margin_db=quality_margin_db)
        if diagnose_flips:  # where the reference's own float sensitivity comes from (on the CPU)
            report.diagnosis = diagnose(with_dls_mode(deploy, cands[0].dls).cpu(), pairs, deg)
        return report
    finally:
        for r in runners:
            r.close()
