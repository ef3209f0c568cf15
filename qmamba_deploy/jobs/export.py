"""The ``fold`` and ``export`` jobs: checkpoint -> deploy bundle -> ONNX -> validation report.

``run_export`` is the main job of the product. From a float checkpoint (the embedded
default when none is given) it quantizes with PTQ (W8A8 minmax unless told otherwise),
from a quantized checkpoint it takes the quantizers as trained; either way it folds,
freezes the static DLS scales, writes the bundle, exports the ONNX, validates it in
ONNX Runtime against PyTorch on the built-in eval images and writes a report — all
into one folder that appears complete or not at all (built beside it, then swapped in).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import check_out_folder, check_outputs, kind, make_manifest, sha256_file, staged_folder, write_json
from ..checkpoints import load_model
from ..data.datasets import STREAM_STARTS, PatchStream, load_pairs
from ..data.degrade import model_degradation
from ..defaults import default_checkpoint
from ..errors import CheckpointError, OptionError
from ..export.onnx_export import ExportOptions, export_onnx
from ..fold import calibrate_dls, fold, load_bundle, save_bundle
from ..models.card import card_of
from ..quant.qconfig import PTQ_METHODS, QConfig
from ..runtime import OrtRunner, TorchRunner
from .quantize import ptq
from .validate import DEFAULT_QUALITY_MARGIN_DB, Output, reference_outputs, validate_outputs

#: What a finished export folder holds (the files a rerun may replace).
EXPORT_FILES = ("bundle.safetensors", "bundle.json", "model.onnx", "model.json", "report.json", "report.md")
NO_PTQ = "none"


@dataclass
class DeployConfig:
    """How to get from a checkpoint (or a bundle) to a calibrated deploy model."""

    checkpoint: str | None = None          # None: the embedded default for ``scale``
    bundle: str | None = None              # start from a bundle instead of a checkpoint
    scale: int | None = None
    method: str = "minmax"                 # PTQ for float checkpoints; "none" keeps FP32
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "tensor"          # PTQ weight scales per tensor or per output channel
    calib_batches: int = 8                 # PTQ observers and static DLS, training patches
    calib_patch: int = 48
    data: str = "builtin"                  # calibration images (training split)
    seed: int = 0

    def __post_init__(self):
        if self.checkpoint and self.bundle:
            raise OptionError("--checkpoint and --bundle both given; pass one (a bundle is already folded)")
        if self.method not in PTQ_METHODS + (NO_PTQ,):
            raise OptionError(f"--method {self.method!r} cannot run inside export; use {', '.join(PTQ_METHODS)} "
                              f"or none (QAT methods: run `qmamba-deploy quantize` first, then export its "
                              f"checkpoint)")
        if self.method != NO_PTQ:
            QConfig(self.method, self.w_bits, self.a_bits, w_granularity=self.w_granularity)  # validates them
        if self.calib_batches < 1:
            raise OptionError("--calib-batches must be at least 1")

    def inputs(self) -> dict[str, str | None]:
        """What the job reads (flag -> path), for :func:`~qmamba_deploy.artifacts.check_outputs`."""
        files = {"--checkpoint": self.checkpoint, "--bundle": self.bundle, "--data": self.data,
                 "--val-data": getattr(self, "val_data", None)}
        return {flag: p for flag, p in files.items() if p and p != "builtin"}


@dataclass
class ExportConfig(DeployConfig):
    scan: str = "plugin"
    dls: str = "static"
    int4_weights: bool = False
    validate: bool = True
    val_data: str = "builtin"
    min_psnr_between: float = 50.0
    quality_margin_db: float = DEFAULT_QUALITY_MARGIN_DB

    def options(self) -> ExportOptions:
        return ExportOptions(scan=self.scan, dls=self.dls, int4_weights=self.int4_weights)

    def __post_init__(self):
        super().__post_init__()
        self.options()  # validates scan / dls


# ------------------------------------------------------------------------ stages


def load_source(cfg: DeployConfig) -> nn.Module:
    """The model to fold: the checkpoint (PTQ-quantized when float and a method is set) or a bundle."""

    if cfg.bundle:
        return load_bundle(cfg.bundle)
    path = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg.scale)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path} is not a file; pass a .pth/.safetensors checkpoint")
    model = load_model(path)
    if cfg.scale is not None and int(getattr(model, "upscale", 1)) != cfg.scale:
        raise OptionError(f"--scale {cfg.scale} does not match {path}, which upscales x{model.upscale}")
    if model.card.qconfig is None and cfg.method != NO_PTQ:
        if getattr(cfg, "int4_weights", False) and cfg.w_bits > 4:  # before PTQ spends any time
            raise OptionError(f"--int4-weights stores 4-bit weights, but --w-bits is {cfg.w_bits}; "
                              f"pass --w-bits 4 (or 2), or drop --int4-weights")
        model = _ptq(model, cfg)
    return model


def _calibration(model: nn.Module, cfg: DeployConfig, use: str) -> list[torch.Tensor]:
    """``cfg.calib_batches`` patches of the job's calibration stream, for ``use`` (STREAM_STARTS)."""
    stream = PatchStream(cfg.data, cfg.calib_patch, batch=1, seed=cfg.seed, augment=False)
    return stream.take(model_degradation(model), int(getattr(model, "in_chans", 3)), cfg.calib_batches,
                       start=STREAM_STARTS[use])


def _ptq(model: nn.Module, cfg: DeployConfig) -> nn.Module:
    return ptq(model, QConfig(cfg.method, cfg.w_bits, cfg.a_bits, w_granularity=cfg.w_granularity),
               _calibration(model, cfg, "ptq"))


def deploy_model(cfg: DeployConfig) -> tuple[nn.Module, nn.Module | None]:
    """(deploy model, the fake-quant model it was folded from — None when starting from a bundle)."""

    source = load_source(cfg)
    if cfg.bundle:
        return source, None
    deploy = fold(source)
    calibrate_dls(deploy, _calibration(source, cfg, "static-dls"),
                  source=f"{cfg.data} training split, {cfg.calib_patch}px patches, seed {cfg.seed}")
    return deploy, source


def _provenance(cfg: DeployConfig, deploy: nn.Module, command: str | None) -> dict[str, Any]:
    src = deploy.card.source
    return {"made_by": "qmamba-deploy", "command": command, "config": asdict(cfg), "checkpoint": src,
            "checkpoint_sha256": sha256_file(src) if src and Path(src).is_file() else None}


def run_fold(cfg: DeployConfig, out: str | os.PathLike, command: str | None = None) -> dict[str, Any]:
    """``qmamba-deploy fold``: write OUT/bundle.safetensors + bundle.json; returns the manifest."""

    if cfg.bundle:
        raise OptionError("fold takes --checkpoint (a bundle is already folded)")
    out = Path(out)
    check_outputs(cfg.inputs(), folders={"--out": out})
    check_out_folder(out, EXPORT_FILES)
    deploy, _ = deploy_model(cfg)
    with staged_folder(out, EXPORT_FILES) as tmp:
        manifest = save_bundle(deploy, tmp, _provenance(cfg, deploy, command))
    return manifest


@dataclass
class ExportResult:
    out: Path
    bundle: dict[str, Any]
    onnx: dict[str, Any]
    report: Any  # ValidationReport or None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.report is None or self.report.passed


def validation_outputs(deploy: nn.Module, fake: nn.Module | None, onnx_paths: dict[str, tuple[str, str]]):
    """Outputs for validate_outputs: the fake-quant model (quality only), the deploy model per
    DLS mode (references) and each ONNX (name -> (path, dls mode)) in ONNX Runtime against its reference."""

    outputs = []
    if fake is not None:
        quantized = card_of(fake).qconfig is not None
        name = "torch fake-quant" if quantized else "torch float"
        outputs.append(Output(name, TorchRunner.from_module(fake, name).open()))
    outputs += reference_outputs(deploy, [mode for _, mode in onnx_paths.values()])
    for name, (path, mode) in onnx_paths.items():
        outputs.append(Output(name, OrtRunner(path).open(), reference=f"torch deploy ({mode} DLS)", path=str(path)))
    return outputs


def _eval_pairs(deploy: nn.Module, data: str):
    """(degradation, eval-split pairs) for the model's task."""

    deg = model_degradation(deploy)
    return deg, load_pairs(data, deg, int(getattr(deploy, "in_chans", 3)), split="eval")


def run_export(cfg: ExportConfig, out: str | os.PathLike, command: str | None = None,
               progress: bool = False) -> ExportResult:
    """The main job; see the module docstring. Validation failures are in the result, not raised.

    An export that fails (e.g. --int4-weights on 8-bit weights) fails inside the staged folder,
    so nothing is left behind."""

    t0 = time.perf_counter()
    out = Path(out)
    check_outputs(cfg.inputs(), folders={"--out": out})
    check_out_folder(out, EXPORT_FILES)
    deploy, fake = deploy_model(cfg)
    report = None
    with staged_folder(out, EXPORT_FILES) as tmp:
        bundle = save_bundle(deploy, tmp, _provenance(cfg, deploy, command))
        onnx_manifest = export_onnx(deploy, tmp / "model.onnx", cfg.options(),
                                    source={"bundle": "bundle.safetensors", "bundle_sha256": bundle["sha256"]})
        if cfg.validate:
            deg, pairs = _eval_pairs(deploy, cfg.val_data)
            name = f"onnxruntime ({cfg.scan} scan)"
            outputs = validation_outputs(deploy, fake, {name: (str(tmp / "model.onnx"), cfg.dls)})
            report = validate_outputs(outputs, pairs, deg, cfg.min_psnr_between, progress=progress,
                                      quality_margin_db=cfg.quality_margin_db)
            for o in report.outputs:       # paths as they will be after the swap
                o.path = str(out / Path(o.path).name) if o.path else None
        summary = {"bundle": _bundle_summary(bundle), "onnx": _onnx_summary(onnx_manifest),
                   "validation": report.as_dict() if report else None,
                   "seconds": round(time.perf_counter() - t0, 1)}
        write_json(tmp / "report.json", make_manifest(kind("export report"), command=command,
                                                      config=asdict(cfg), **summary))
        (tmp / "report.md").write_text(export_markdown(cfg, bundle, onnx_manifest, report, command))
    return ExportResult(out, bundle, onnx_manifest, report, time.perf_counter() - t0)


def _bundle_summary(bundle: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": bundle["sha256"], "qconfig": bundle["qconfig"], "size": bundle["size"],
            "dls_calibration": bundle["dls_calibration"], "sites": len(bundle["sites"])}


def _onnx_summary(m: dict[str, Any]) -> dict[str, Any]:
    g = m["graph"]
    return {"sha256": m["sha256"], "options": m["options"], "nodes": g["nodes"], "scan_nodes": g["scan_nodes"],
            "quantize_linear": g["quantize_linear"], "dequantize_linear": g["dequantize_linear"],
            "integer_initializers": g["integer_initializers"], "int4_weights": m["int4_weights"]}


def export_markdown(cfg: ExportConfig, bundle: dict[str, Any], onnx_manifest: dict[str, Any], report,
                    command: str | None) -> str:
    q = bundle["qconfig"]
    label = f"{q['method']} W{q['w_bits']}A{q['a_bits']}" if q else "float (FP32)"
    size = bundle["size"]
    g = onnx_manifest["graph"]
    lines = [
        f"# Export report: {bundle['arch']} ({label})", "",
        f"Command: `{command or 'run_export()'}`", "",
        f"- bundle: {size['weight_bytes'] / 1e6:.3f} MB of tensors vs {size['fp32_param_bytes'] / 1e6:.3f} MB "
        f"FP32 parameters ({size['change_vs_fp32'] * 100:+.1f} %)",
        f"- ONNX: scan `{cfg.scan}`, DLS `{cfg.dls}`, {g['nodes']} nodes, {g['quantize_linear']} QuantizeLinear, "
        f"{g['dequantize_linear']} DequantizeLinear, {g['scan_nodes']} QMambaSelectiveScan, "
        f"integer initializers {json.dumps(g['integer_initializers'])}",
    ]
    if report is not None:
        lines += ["", f"## Validation ({'passed' if report.passed else 'FAILED'}: ONNX Runtime vs PyTorch, "
                      f"threshold {report.min_psnr_between:g} dB PSNR-between, at most "
                      f"{report.quality_margin_db:g} dB of Y-PSNR lost)", "", "```", report.table(), "```"]
    return "\n".join(lines) + "\n"


__all__ = ["DeployConfig", "ExportConfig", "ExportResult", "run_export", "run_fold", "deploy_model", "load_source",
           "validation_outputs", "EXPORT_FILES"]
