"""`qmamba-deploy` command line: one small function per subcommand, no logic here."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

import click

from .artifacts import check_outputs, check_writable, kind, make_manifest, write_json
from .checkpoints import load_model
from .data.builtin import restore_samples
from .data.datasets import load_pairs
from .data.degrade import TASKS, degradation_for
from .data.io import list_images
from .defaults import default_checkpoint
from .errors import OptionError, QMambaError
from .jobs import bench as b
from .jobs.bench import parse_shape
from .jobs.evaluate import evaluate_runner
from .jobs.export import DeployConfig, ExportConfig, run_export, run_fold
from .jobs.inspect import describe_checkpoint, format_summary, preset_table
from .jobs.quantize import QuantizeConfig, SPR2QConfig
from .jobs.quantize import quantize as run_quantize
from .jobs.restore import output_paths, restore_files
from .jobs.sensitivity import MEASUREMENT_SETTINGS, SensitivityConfig, read_policy, rebudget, sensitivity
from .jobs.validate import DEFAULT_QUALITY_MARGIN_DB, validate_artifacts
from .models import resolve_arch
from .quant.qconfig import GROUPINGS, PTQ_METHODS, SPR2Q_VARIANTS, W_GRANULARITIES
from .quant.qconfig import METHODS as QUANT_METHODS
from .quant.quantizers import STEP_INITS
from .quant.spr2q import BOUND_INITS
from .runtime import artifact_kind, open_runner
from .runtime.allocator import keep_freed_memory
from .train import LOSSES, SCHEDULES, TrainConfig, cleanup_distributed, train_restoration
from .trt.engine import HARDWARE_LEVELS, TRT_MODULES, BuildConfig, Profile, build_engine
from .trt.lint import lint_onnx
from .trt.package import TARGETS as PACKAGE_TARGETS
from .trt.package import package as make_package


def _quiet_libraries() -> None:
    """Keep other libraries' advice out of the user's terminal: torch.export's deprecation
    notices and the ONNX exporter's "torchvision is not installed" log lines say nothing about
    the user's model or command."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Group(click.Group):
    """Prints user errors (QMambaError) as one line, exit status 2, no traceback; Ctrl-C exits 130."""

    def parse_args(self, ctx, args):
        ctx.meta["qmamba_argv"] = list(args)  # for the provenance of what a command writes
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        _quiet_libraries()
        keep_freed_memory()
        try:
            return super().invoke(ctx)
        except QMambaError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted: nothing half-written was kept", fg="red", err=True)
            # os._exit, not sys.exit: a KeyboardInterrupt that passed through any nested PyRun_* call
            # (C extensions evaluating Python) leaves CPython's "unhandled interrupt" flag set, and the
            # interpreter then kills itself with SIGINT at exit whatever status sys.exit asked for (one
            # CI run saw -2 after this line had printed). Everything staged is already removed here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


#: Flag value ranges, checked where click parses them (one sentence naming the flag and the range).
_NONNEG, _POS = click.IntRange(min=0), click.IntRange(min=1)
_NONNEGF, _POSF = click.FloatRange(min=0), click.FloatRange(min=0, min_open=True)


def _parse_layer_bits(value: str) -> tuple[str, int, int]:
    """--layer-bits 'PATTERN=W8A8' -> (PATTERN, 8, 8)."""
    pattern, _, bits = value.rpartition("=")
    found = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", bits.strip())
    if not pattern or not found:
        raise OptionError(f"--layer-bits {value!r} is not PATTERN=WxAy (e.g. '*.wqkv=W8A8')")
    return pattern, int(found.group(1)), int(found.group(2))


def _parse_kwargs(items: tuple[str, ...]) -> dict:
    """--kwarg name=value (value parsed as JSON when it can be, else a string)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not name=value", param_hint="--kwarg")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qmamba-deploy")
def main():
    """MambaIR-family restoration: checkpoint -> quantized ONNX -> TensorRT engine."""


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--arch", help="Official class name or preset; default: from the manifest or detected from the keys.")
@click.option("--kwarg", "kwargs", multiple=True, help="Constructor override name=value (repeatable).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
def info(checkpoint, arch, kwargs, json_out):
    """Describe CHECKPOINT: detected architecture, arguments, parameters, layers."""

    _check_json(json_out, checkpoint=checkpoint)
    summary = describe_checkpoint(checkpoint, arch=arch, **_parse_kwargs(kwargs))
    click.echo(format_summary(summary))
    if json_out:
        write_json(json_out, summary)


@main.command()
def presets():
    """List the named presets (every released configuration) with parameter counts."""

    click.echo(preset_table())


def _check_json(json_out, **inputs) -> None:
    """--json: writable, and not one of the command's inputs (checked before any work)."""

    if json_out:
        check_writable(json_out, "--json", folder=False)
        check_outputs({f"--{k.replace('_', '-')}": v for k, v in inputs.items()}, files={"--json": json_out})


def _report_failures(failures: list[tuple[str, str]], what: str) -> None:
    """Print the images that failed (the others were done) and exit 1."""
    if failures:
        for source, message in failures:
            click.secho(f"failed: {source}: {message}", fg="red", err=True)
        click.secho(f"error: {len(failures)} of the {what} failed (the others were written)", fg="red", err=True)
        sys.exit(1)


_QUALITY_MARGIN_OPTION = click.option(
    "--quality-margin", "quality_margin_db", type=_NONNEGF, default=DEFAULT_QUALITY_MARGIN_DB, show_default=True,
    help="Fail when a candidate's mean Y-PSNR (vs ground truth) is this much below its reference's, however well "
         "they agree; a candidate that disagrees without losing quality is reported as 'sensitive'.")
_MAX_MP_OPTION = click.option(
    "--max-megapixels", type=_POSF, default=64.0, show_default=True,
    help="Refuse images larger than this (checked from the file header, before decoding).")


def _model_option(default_help: str):
    return click.option("--model", "--checkpoint", "model", type=click.Path(),
                        help="What to run: a checkpoint (.pth/.safetensors), a deploy bundle (bundle.safetensors or "
                             f"its folder), an ONNX (.onnx) or a TensorRT engine (.engine); {default_help}")


def _runner_options(f):
    """How to run --model: device, and the options only some kinds take."""
    options = [
        click.option("--arch", help="Checkpoints: official class name or preset (default: detected)."),
        click.option("--kwarg", "kwargs", multiple=True,
                     help="Checkpoints: constructor override name=value (repeatable)."),
        click.option("--dls", type=click.Choice(["static", "dynamic"]), default=None,
                     help="Bundles: DLS mode (default: static when calibrated)."),
        click.option("--device", default=None,
                     help="cpu or cuda (torch also cuda:N); default: cuda for engines, cpu otherwise."),
        click.option("--plugin", type=click.Path(dir_okay=False),
                     help="Engines: the plugin library (default: the one engine.json names, $QMAMBA_PLUGIN_LIB, "
                          "build/)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _open_runner(model, arch=None, kwargs=(), dls=None, device=None, plugin=None, **extra):
    return open_runner(model, arch=arch, kwargs=_parse_kwargs(kwargs), dls=dls, device=device, plugin=plugin, **extra)


def _describe_runner(runner) -> str:
    info = runner.info
    return (f"model: {info.arch or 'unknown network'} x{info.scale} {info.precision} from {runner.path} "
            f"({runner.kind} on {runner.device}; accepts {runner.limits.describe()})")


@main.command()
@_model_option("default: the embedded model in models/.")
@click.option("--input", "input_", default="builtin", show_default=True,
              help="An image, a folder of images, or 'builtin' (sample photos from scikit-image).")
@click.option("--output", default="out/restore", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the restored PNGs.")
@_runner_options
@click.option("--tile", type=_NONNEG, default=256, show_default=True,
              help="Tile size in input pixels for large images (0: whole image at once, or the largest tile the "
                   "artifact takes).")
@click.option("--overlap", type=_NONNEG, default=16, show_default=True, help="Tile overlap in input pixels.")
@click.option("--bit-depth", type=click.Choice(["auto", "8", "16"]), default="auto", show_default=True,
              help="Output PNG bit depth (auto: as the input).")
@click.option("--suffix", default="", help="Appended to each output file stem.")
@_MAX_MP_OPTION
def restore(model, input_, output, arch, kwargs, dls, device, plugin, tile, overlap, bit_depth, suffix,
            max_megapixels):
    """Restore images with a model of any kind (super-resolution, denoising or JPEG removal).

    Images that cannot be read or restored are reported at the end (exit status 1); the others
    are written."""

    if tile and overlap >= tile:
        raise click.BadParameter(f"{overlap} must be smaller than --tile {tile}", param_hint="--overlap")
    path = model or default_checkpoint()
    sources = restore_samples() if input_ == "builtin" else list_images(input_)
    check_writable(output, "--output")
    check_outputs({"--model": path}, files={"--output": output_paths(sources, output, suffix)})
    failures: list[tuple[str, str]] = []
    with _open_runner(path, arch, kwargs, dls, device, plugin) as runner:
        results = restore_files(runner, sources, output, tile=tile or None, overlap=overlap,
                                bit_depth=None if bit_depth == "auto" else int(bit_depth), suffix=suffix,
                                failures=failures if len(sources) > 1 else None,  # one image: its sentence
                                max_pixels=int(max_megapixels * 1e6))
        click.echo(_describe_runner(runner))
    for r in results:
        notes = f"  ({'; '.join(r.notes)})" if r.notes else ""
        click.echo(f"{r.source} {r.input_size[1]}x{r.input_size[0]} -> {r.output} "
                   f"{r.output_size[1]}x{r.output_size[0]}{notes}")
    _report_failures(failures, "images")


def _command_line() -> str:
    argv = click.get_current_context().meta.get("qmamba_argv", sys.argv[1:])
    return shlex.join(["qmamba-deploy", *argv])


def _report(headline: str, result, out: str) -> None:
    """What train and quantize print when done (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    click.echo(headline)
    if result.validation:
        click.echo("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in result.validation.items()))
    click.echo(f"model: {Path(out) / 'model.safetensors'}")


_TASK_OPTIONS = [
    click.option("--task", type=click.Choice(TASKS), default=None,
                 help="Degradation: bicubic SR, Gaussian colour noise, or JPEG (default: from the checkpoint, "
                      "else sr)."),
    click.option("--scale", type=click.IntRange(1, 8), default=None, help="SR factor (default: the model's)."),
    click.option("--sigma", type=click.FloatRange(0, 255), default=None,
                 help="Noise std on the 0..255 scale for --task denoise [25]."),
    click.option("--quality", type=click.IntRange(1, 100), default=None, help="JPEG quality for --task jpeg [40]."),
]


def _task_options(f):
    for option in reversed(_TASK_OPTIONS):
        f = option(f)
    return f


@main.command(name="eval")
@_model_option("default: the embedded model for --scale (x2 or x4).")
@click.option("--data", default="builtin", show_default=True,
              help="'builtin' (the fixed eval split), a folder of HR images, or a BasicSR benchmark folder "
                   "(HR/ + LR_bicubic/X<s>/).")
@_task_options
@_runner_options
@click.option("--tile", type=_NONNEG, default=0, show_default=True,
              help="Tile size in input pixels (0: whole images, or the largest tile the artifact takes).")
@click.option("--overlap", type=_NONNEG, default=16, show_default=True, help="Tile overlap in input pixels.")
@click.option("--seed", type=_NONNEG, default=0, show_default=True, help="Seed of the synthetic noise (denoise).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
@_MAX_MP_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(model, data, task, scale, sigma, quality, arch, kwargs, dls, device, plugin, tile, overlap, seed,
             json_out, max_megapixels, quiet):
    """PSNR/SSIM of a model of any kind on a dataset, beside the bicubic / noisy / JPEG baseline."""

    if tile and overlap >= tile:
        raise click.BadParameter(f"{overlap} must be smaller than --tile {tile}", param_hint="--overlap")
    path = model or default_checkpoint(scale)
    _check_json(json_out, model=path, data=None if data == "builtin" else data)
    failures: list[tuple[str, str]] = []
    with _open_runner(path, arch, kwargs, dls, device, plugin) as runner:
        info = runner.info
        deg = degradation_for(info.scale, info.task, task, scale, sigma, quality)
        pairs = load_pairs(data, deg, channels=info.in_chans, split="eval", failures=failures,
                           max_pixels=int(max_megapixels * 1e6))
        report = evaluate_runner(runner, pairs, deg, tile=tile or None, overlap=overlap, seed=seed,
                                progress=not quiet)
        described = runner.describe()
        click.echo(_describe_runner(runner))
    click.echo(f"data: {data} ({len(pairs)} images), {deg.label}, {report.metric}, crop_border {deg.crop_border}")
    click.echo(report.table())
    notes = sorted({f"{p.name}: {n}" for p in pairs for n in p.notes})
    for note in notes:
        click.echo(f"note: {note}")
    if json_out:
        write_json(json_out, make_manifest(kind("eval report"), model=str(path), artifact=described,
                                           data=data, command=_command_line(), **report.as_dict(),
                                           failed=[{"image": f, "error": m} for f, m in failures]))
    _report_failures(failures, "images")


@main.command()
@click.option("--arch", default="mambairv2-tiny-x2", show_default=True, help="Preset or official class name.")
@click.option("--kwarg", "kwargs", multiple=True, help="Constructor override name=value (repeatable).")
@click.option("--task", type=click.Choice(TASKS), default="sr", show_default=True)
@click.option("--scale", type=click.IntRange(1, 8), default=None, help="SR factor (default: the preset's).")
@click.option("--sigma", type=click.FloatRange(0, 255), default=25.0, show_default=True,
              help="Noise std (denoise), 0..255 scale.")
@click.option("--quality", type=click.IntRange(1, 100), default=40, show_default=True, help="JPEG quality (jpeg).")
@click.option("--data", default="builtin", show_default=True, help="'builtin' or a folder of HR images.")
@click.option("--val-data", default="builtin", show_default=True, help="Validation images, or 'none'.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder; rerunning the same command resumes from its last checkpoint.")
@click.option("--iters", type=_POS, default=1000, show_default=True)
@click.option("--patch", type=click.IntRange(8, 1024), default=48, show_default=True, help="Model input patch size.")
@click.option("--batch", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Patches per step (per process).")
@click.option("--lr", type=_POSF, default=2e-4, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="multistep",
              show_default=True)
@click.option("--milestones", default="0.5,0.8,0.9,0.95", show_default=True,
              help="multistep: fractions of --iters where the rate is multiplied by --gamma.")
@click.option("--gamma", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True)
@click.option("--warmup", type=_NONNEG, default=0, show_default=True, help="Linear warm-up iterations.")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="EMA decay of the weights (0: off).")
@click.option("--grad-clip", type=_NONNEGF, default=0.0, show_default=True, help="Max gradient norm (0: off).")
@click.option("--loss", type=click.Choice(list(LOSSES)), default=None,
              help="Default: l1 for sr, charbonnier for denoise/jpeg.")
@click.option("--init", type=click.Path(dir_okay=False), help="Start from these weights (fine-tuning).")
@click.option("--val-every", type=_NONNEG, default=0, show_default=True,
              help="Validate every N iterations (0: at the end).")
@click.option("--save-every", type=_POS, default=500, show_default=True)
@click.option("--log-every", type=_POS, default=10, show_default=True)
@click.option("--seed", type=_NONNEG, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (one GPU per torchrun process).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(arch, kwargs, task, scale, sigma, quality, data, val_data, out, iters, patch, batch, lr, schedule,
          milestones, gamma, warmup, ema, grad_clip, loss, init, val_every, save_every, log_every, seed, device,
          quiet):
    """Train a restoration model (run under torchrun for several processes / GPUs / nodes)."""

    try:
        ms = tuple(float(m) for m in milestones.split(",") if m.strip())
    except ValueError:
        raise OptionError(f"--milestones {milestones!r} is not a comma-separated list of fractions") from None
    kw = _parse_kwargs(kwargs)
    try:
        _, full = resolve_arch(arch, kw)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    preset_scale = int(full.get("upscale", 1))
    if task == "sr":
        scale = scale or preset_scale
        if scale != preset_scale:
            kw["upscale"] = scale
    cfg = TrainConfig(arch=arch, kwargs=kw, task=task, scale=scale or 1, sigma=sigma, quality=quality, data=data,
                      val_data=None if val_data == "none" else val_data, patch=patch, batch=batch, iters=iters,
                      lr=lr, schedule=schedule, milestones=ms, gamma=gamma, warmup=warmup, ema=ema,
                      grad_clip=grad_clip, loss=loss, init=init, val_every=val_every, save_every=save_every,
                      log_every=log_every, seed=seed, device=device)
    try:
        result = train_restoration(cfg, out, command=_command_line(), progress=not quiet)
    finally:
        cleanup_distributed()
    _report(f"trained {result.iteration} iterations in {result.seconds:.0f} s"
            + (f" (resumed at {result.resumed_from})" if result.resumed_from else ""), result, out)


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="The float model (default: the embedded x2 model).")
@click.option("--method", type=click.Choice([*QUANT_METHODS, "spr2q"]), default="qmambair", show_default=True,
              help="QAT: qmambair (DLS + RFA), dls, rfa, lsq, lsq+. PTQ: minmax, percentile, mse. "
                   "spr2q: rectifier groups fused into the weights (PTQ with a short fine-tune).")
@click.option("--w-bits", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--a-bits", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--w-granularity", type=click.Choice(W_GRANULARITIES), default="tensor", show_default=True,
              help="Weight step sizes: one per tensor (the papers) or one per output channel (lsq, rfa and PTQ "
                   "weights; exported as DequantizeLinear along the output axis).")
@click.option("--scan-bits", type=click.IntRange(1, 16), default=None,
              help="Bits of the scan operands (default: --a-bits).")
@click.option("--data", default="builtin", show_default=True,
              help="Training / calibration images: 'builtin' (the built-in train split) or a folder of HR images. "
                   "QAT on natural photos (DF2K, or tools/natural_photos.py's folder) scores better than on the "
                   "built-in split, which is mostly textures (docs/quantization.md, 'Training photos').")
@click.option("--val-data", default="builtin", show_default=True, help="Validation images, or 'none'.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder; the result is OUT/model.safetensors. A rerun resumes QAT.")
@click.option("--iters", type=_POS, default=1000, show_default=True, help="QAT iterations.")
@click.option("--calib-batches", type=_POS, default=4, show_default=True,
              help="Batches that initialise (QAT) or calibrate (PTQ) the quantizers.")
@click.option("--patch", type=click.IntRange(8, 1024), default=48, show_default=True)
@click.option("--batch", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--lr", type=_POSF, default=1e-4, show_default=True, help="QAT learning rate of the weights.")
@click.option("--quant-lr", type=_POSF, default=None, help="QAT learning rate of quantizer parameters (default --lr).")
@click.option("--step-init", type=click.Choice(STEP_INITS), default="lsq", show_default=True,
              help="QAT: how the learnable step sizes (LSQ, LSQ+, RFA) start on the first calibration batch: "
                   "LSQ's 2·mean|x|/sqrt(Qp) (the papers), or the step that minimises the rounding error.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="multistep",
              show_default=True)
@click.option("--distill", type=_NONNEGF, default=0.0, show_default=True,
              help="Weight of L1 to the float model's output in the QAT loss (0: ground truth only).")
@click.option("--distill-features", type=_NONNEGF, default=0.0, show_default=True,
              help="Weight of the block feature-alignment term in the QAT loss: each block's squared error to "
                   "the float model's, relative to its size, averaged over blocks (0: none).")
@click.option("--margin-noise", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="QAT: add σ·U(-1/2, 1/2) of a step to every activation quantizer's input in training, so that "
                   "the model does not depend on which side of a rounding boundary a value falls (0: off).")
@click.option("--qdrop", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="QAT: in training, leave this fraction of every activation quantizer's outputs at their float "
                   "values, chosen at random per element (QDrop; 0: off).")
@click.option("--save-every", type=_POS, default=500, show_default=True)
@click.option("--val-every", type=_NONNEG, default=0, show_default=True)
@click.option("--seed", type=_NONNEG, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--rank", type=_POS, default=8, show_default=True, help="spr2q: rank of each rectifier.")
@click.option("--group-size", type=_POS, default=4, show_default=True, help="spr2q: rectifiers per layer.")
@click.option("--route-iters", type=_NONNEG, default=100, show_default=True,
              help="spr2q: iterations of static routing calibration.")
@click.option("--feature-weight", type=_NONNEGF, default=1.0, show_default=True,
              help="spr2q: weight of the block feature-alignment term of the hybrid loss.")
@click.option("--spr2q-variant", type=click.Choice(SPR2Q_VARIANTS),
              default="group", show_default=True,
              help="spr2q ablations: plain PTQ, trained bounds only, one rectifier, group without static routing.")
@click.option("--bounds-init", type=click.Choice(BOUND_INITS), default="mse", show_default=True,
              help="spr2q: Q_{a,b} bounds from the first calibration batch: the range that minimises the "
                   "quantization error, or its min and max.")
@click.option("--policy", default="paper", show_default=True,
              help="Precision policy: 'paper' (the papers' placement) or a JSON file from `sensitivity --json`.")
@click.option("--keep-fp", multiple=True, metavar="PATTERN",
              help="Leave the modules matching this fnmatch pattern in float (repeatable; added to --policy).")
@click.option("--layer-bits", multiple=True, metavar="PATTERN=WxAy",
              help="Bits for the modules matching PATTERN, e.g. '*.wqkv=W8A8' (repeatable; after --policy's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quantize(checkpoint, method, w_bits, a_bits, w_granularity, scan_bits, data, val_data, out, iters, calib_batches,
             patch, batch, lr, quant_lr, step_init, schedule, distill, distill_features, margin_noise, qdrop,
             save_every, val_every, seed, device, rank, group_size, route_iters, feature_weight, spr2q_variant,
             bounds_init, policy, keep_fp, layer_bits, quiet):
    """Quantize a float checkpoint (QAT with the training loop, or PTQ calibration)."""

    chosen = read_policy(policy)
    keep = tuple(chosen["keep_fp"]) + tuple(keep_fp)
    overrides = tuple(tuple(o) for o in chosen["overrides"]) + tuple(_parse_layer_bits(v) for v in layer_bits)
    ckpt = str(checkpoint or default_checkpoint())
    fp = load_model(ckpt)
    task = fp.card.task or {}
    up = int(getattr(fp, "upscale", 1))
    spr2q = dict(rank=rank, group_size=group_size, route_iters=route_iters, feature_weight=feature_weight,
                 variant=spr2q_variant, bounds_init=bounds_init) if method == "spr2q" else {}
    config = SPR2QConfig if spr2q else QuantizeConfig
    cfg = config(**spr2q, arch=fp.card.arch, kwargs=dict(fp.card.kwargs),
                 task=task.get("task", "sr" if up > 1 else "denoise"), scale=up, sigma=task.get("sigma", 25.0),
                 quality=task.get("quality", 40), data=data, val_data=None if val_data == "none" else val_data,
                 patch=patch, batch=batch, iters=iters, lr=lr, schedule=schedule, val_every=val_every,
                 save_every=save_every, seed=seed, device=device, checkpoint=ckpt, method=method, w_bits=w_bits,
                 a_bits=a_bits, scan_bits=scan_bits, distill=distill, distill_features=distill_features,
                 margin_noise=margin_noise, qdrop=qdrop,
                 calib_batches=calib_batches, quant_lr=quant_lr,
                 w_granularity=w_granularity, keep_fp=keep, overrides=overrides, step_init=step_init)
    try:
        result = run_quantize(cfg, out, command=_command_line(), progress=not quiet)
    finally:
        cleanup_distributed()
    _report(f"{cfg.qconfig().label} from {ckpt} in {result.seconds:.0f} s", result, out)
    if data == "builtin" and cfg.trains_in_loop and int(os.environ.get("RANK", "0")) == 0:
        click.echo("note: this QAT trained on the built-in train split (mostly textures, retina and deep sky); on "
                   "natural photos it scores better (W4A4: +0.16 dB at 150 iterations): pass --data DIR, e.g. DF2K "
                   "or the folder tools/natural_photos.py builds (docs/quantization.md, 'Training photos')")


@main.command(name="sensitivity")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(PTQ_METHODS), default="mse", show_default=True,
              help="PTQ observers of every measured model.")
@click.option("--w-bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--a-bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--w-granularity", type=click.Choice(W_GRANULARITIES), default="tensor", show_default=True)
@click.option("--by", type=click.Choice(GROUPINGS), default="kind", show_default=True,
              help="kind: the same layer in every block; block: every layer of one residual group.")
@click.option("--budget", type=click.FloatRange(0, 1), default=0.10, show_default=True,
              help="Share of the quantized weights the recommended policy may promote.")
@click.option("--promote-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="Bits of the promoted groups (8 keeps the engine integer).")
@click.option("--data", default="builtin", show_default=True, help="Calibration images (training split).")
@click.option("--val-data", default="builtin", show_default=True, help="Images the PSNR is measured on.")
@click.option("--calib-batches", type=_POS, default=4, show_default=True)
@click.option("--patch", type=click.IntRange(8, 1024), default=48, show_default=True)
@click.option("--batch", type=click.IntRange(1, 4096), default=4, show_default=True)
@click.option("--seed", type=_NONNEG, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Write the table and the recommended policy (for `quantize --policy`) as JSON.")
@click.option("--from", "from_report", type=click.Path(dir_okay=False),
              help="An earlier --json report: re-derive the policy at --budget / --promote-bits from its measured "
                   "groups without measuring them again (its own method, bits and calibration are kept, and "
                   "flags that would change them are refused; CHECKPOINT replaces its checkpoint path); only the "
                   "new policy is measured.")
@click.option("--quiet", is_flag=True, help="Only the table.")
def sensitivity_command(checkpoint, method, w_bits, a_bits, w_granularity, by, budget, promote_bits, data, val_data,
                        calib_batches, patch, batch, seed, json_out, from_report, quiet):
    """PSNR each layer group costs when quantized (alone, and kept in float), and a recommended policy."""
    if from_report:
        ctx = click.get_current_context()
        given = [f"--{p.replace('_', '-')}" for p in MEASUREMENT_SETTINGS
                 if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} cannot change a report read with --from (its groups were "
                                   f"measured with the report's settings); measure a new report without --from")
        _check_json(json_out, **{"from": from_report}, checkpoint=checkpoint)
        report = rebudget(from_report, budget, promote_bits, checkpoint=checkpoint)
        click.echo(report.table())
        if json_out:
            write_json(json_out, report.as_dict())
        return
    ckpt = str(checkpoint or default_checkpoint())
    _check_json(json_out, checkpoint=ckpt)
    cfg = SensitivityConfig(ckpt, method=method, w_bits=w_bits, a_bits=a_bits, w_granularity=w_granularity, by=by,
                            data=data, val_data=val_data, calib_batches=calib_batches, patch=patch, batch=batch,
                            seed=seed, budget=budget, promote_bits=promote_bits)
    report = sensitivity(cfg, progress=not quiet)
    click.echo(report.table())
    if json_out:
        write_json(json_out, report.as_dict())


# ----------------------------------------------------------------------------- deployment


def _deploy_options(f):
    """Options shared by fold and export: where the model comes from and how PTQ calibrates it."""

    options = [
        click.option("--checkpoint", type=click.Path(dir_okay=False),
                     help="Float or quantized checkpoint (default: the embedded model for --scale)."),
        click.option("--scale", type=click.Choice(["2", "4"]), default=None,
                     help="Which embedded model when --checkpoint is not given (default x2)."),
        click.option("--method", type=click.Choice([*PTQ_METHODS, "none"]), default="minmax", show_default=True,
                     help="PTQ for a float checkpoint ('none' keeps it FP32). A quantized checkpoint "
                          "(from `quantize`) is folded as trained."),
        click.option("--w-bits", type=click.IntRange(1, 16), default=8, show_default=True, help="PTQ weight bits."),
        click.option("--a-bits", type=click.IntRange(1, 16), default=8, show_default=True, help="PTQ activation bits."),
        click.option("--w-granularity", type=click.Choice(W_GRANULARITIES), default="tensor", show_default=True,
                     help="PTQ weight scales: one per tensor or one per output channel."),
        click.option("--calib-batches", type=_POS, default=8, show_default=True,
                     help="Training patches for the PTQ observers and for the static DLS scales."),
        click.option("--data", default="builtin", show_default=True, help="Calibration images (training split)."),
        click.option("--seed", type=_NONNEG, default=0, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _deploy_config(cls, checkpoint, scale, method, w_bits, a_bits, w_granularity, calib_batches, data, seed, **extra):
    return cls(checkpoint=checkpoint, scale=int(scale) if scale else None, method=method, w_bits=w_bits,
               a_bits=a_bits, w_granularity=w_granularity, calib_batches=calib_batches, data=data, seed=seed, **extra)


@main.command()
@_deploy_options
@click.option("--out", default="out/bundle", show_default=True, type=click.Path(file_okay=False),
              help="Folder for bundle.safetensors + bundle.json.")
def fold(out, **kw):
    """Fold a (fake-)quantized checkpoint into a deploy bundle: packed integer weights + scales + manifest."""

    manifest = run_fold(_deploy_config(DeployConfig, **kw), out, command=_command_line())
    size = manifest["size"]
    click.echo(f"{out}/bundle.safetensors: {len(manifest['sites'])} sites, {size['weight_bytes'] / 1e6:.3f} MB "
               f"vs {size['fp32_param_bytes'] / 1e6:.3f} MB FP32 ({size['change_vs_fp32'] * 100:+.1f} %)")


@main.command()
@_deploy_options
@click.option("--bundle", type=click.Path(), help="Export a bundle written by `fold` (instead of --checkpoint).")
@click.option("--scan", type=click.Choice(["plugin", "portable"]), default="plugin", show_default=True,
              help="plugin: one QMambaSelectiveScan node per scan (our TensorRT plugin); portable: standard ONNX "
                   "ops (an ONNX Scan over chunks) for runtimes without the plugin.")
@click.option("--dls", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="DLS activations: static (calibrated scales, real INT8) or dynamic (in-graph statistics, exact).")
@click.option("--int4-weights", is_flag=True, help="Store 2-D MatMul weights as INT4 (needs --w-bits <= 4).")
@click.option("--out", default="out/export", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the bundle, model.onnx, model.json and the report (replaced as a whole).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch validation.")
@click.option("--val-data", default="builtin", show_default=True, help="Validation images (the eval split).")
@click.option("--min-psnr-between", type=_NONNEGF, default=50.0, show_default=True,
              help="Fail when ONNX Runtime and PyTorch differ by less than this PSNR on some image (or by more "
                   "than the model's own one-ulp sensitivity allows, when that is lower; see docs/export.md).")
@_QUALITY_MARGIN_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(out, bundle, scan, dls, int4_weights, no_validate, val_data, min_psnr_between, quality_margin_db, quiet,
           **kw):
    """Checkpoint -> (PTQ) -> fold -> ONNX with Q/DQ and the scan op -> validated in ONNX Runtime.

    With no arguments: the embedded x2 model, W8A8 minmax PTQ on the built-in images.
    """

    cfg = _deploy_config(ExportConfig, bundle=bundle, scan=scan, dls=dls, int4_weights=int4_weights,
                         validate=not no_validate, val_data=val_data, min_psnr_between=min_psnr_between,
                         quality_margin_db=quality_margin_db, **kw)
    result = run_export(cfg, out, command=_command_line(), progress=not quiet)
    click.echo((result.out / "report.md").read_text())
    if not result.passed:
        click.secho(f"error: validation failed (PSNR-between below {min_psnr_between:g} dB, or "
                    f"more than {quality_margin_db:g} dB of Y-PSNR lost); "
                    f"see {result.out}/report.md", fg="red", err=True)
        sys.exit(1)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="MODEL...")
@click.option("--bundle", type=click.Path(), help="The bundle the models came from (default: from their manifests).")
@click.option("--data", default="builtin", show_default=True, help="Images (the eval split of 'builtin').")
@click.option("--min-psnr-between", type=_NONNEGF, default=50.0, show_default=True)
@click.option("--max-abs", type=_NONNEGF, default=None, help="Also fail when a max |difference| exceeds this.")
@_QUALITY_MARGIN_OPTION
@click.option("--device", default=None, help="Where to run (default: engines and their reference on cuda, "
                                             "ONNX Runtime on cpu).")
@click.option("--plugin", type=click.Path(dir_okay=False), help="Engines: the plugin library.")
@click.option("--diagnose", "diagnose_flips", is_flag=True,
              help="Also count, per quantizer and per router, the codes and routing decisions that flip between "
                   "float32 and float64 runs of the PyTorch reference: where its float sensitivity starts.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def validate(models, bundle, data, min_psnr_between, max_abs, quality_margin_db, device, plugin, diagnose_flips,
             json_out, quiet):
    """Run the same images through PyTorch and each MODEL (ONNX in ONNX Runtime, engines in TensorRT); compare.

    Each MODEL (.onnx or .engine, any mix) is compared with the PyTorch deploy model of the bundle it
    was made from; `qmamba-deploy validate model.engine` is the on-GPU parity check of an engine."""

    _check_json(json_out, model=list(models), bundle=bundle)
    report = validate_artifacts(list(models), bundle, data, min_psnr_between, max_abs, device=device, plugin=plugin,
                                progress=not quiet, quality_margin_db=quality_margin_db,
                                diagnose_flips=diagnose_flips)
    click.echo(report.table())
    if json_out:
        write_json(json_out, report.as_dict())
    if not report.passed:
        click.secho(f"error: validation failed (thresholds: {min_psnr_between:g} dB PSNR-between"
                    + (f", max |Δ| {max_abs:g}" if max_abs is not None else "")
                    + f", {quality_margin_db:g} dB of Y-PSNR)", fg="red", err=True)
        sys.exit(1)


@main.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--no-parser", is_flag=True, help="Static checks only (skip the TensorRT parser).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the findings as JSON.")
def lint(onnx_file, no_parser, json_out):
    """Check ONNX_FILE against what TensorRT accepts (Q/DQ, plugin node, ops); parse it where TensorRT imports."""

    _check_json(json_out, onnx_file=onnx_file)
    report = lint_onnx(onnx_file, use_parser=not no_parser)
    click.echo(report.text())
    if json_out:
        write_json(json_out, report.as_dict())
    if not report.passed:
        sys.exit(1)


def _profile(min_shape, opt_shape, max_shape):
    opt = parse_shape(opt_shape, "--opt")
    return Profile(parse_shape(min_shape, "--min") if min_shape else opt, opt,
                   parse_shape(max_shape, "--max") if max_shape else opt)


def _profile_options(f):
    f = click.option("--max", "max_shape", help="Largest input NxCxHxW of the profile (default: --opt).")(f)
    f = click.option("--opt", "opt_shape", default="1x3x64x64", show_default=True,
                     help="Input NxCxHxW TensorRT optimizes for.")(f)
    f = click.option("--min", "min_shape", help="Smallest input NxCxHxW of the profile (default: --opt).")(f)
    return f


@main.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@_profile_options
@click.option("--out", default="out/engine", show_default=True, type=click.Path(file_okay=False),
              help="Folder for model.engine + engine.json (replaced as a whole).")
@click.option("--plugin", type=click.Path(dir_okay=False),
              help="libqmamba_scan_plugin.so (default: $QMAMBA_PLUGIN_LIB or build/ of the CMake project).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Read when present, written after the build.")
@click.option("--fp16", is_flag=True,
              help="TensorRT 10 only: weakly typed with FP16+INT8 flags (11 is strongly typed).")
@click.option("--version-compatible", is_flag=True,
              help="Version-compatible engine; the plugin library is serialized in.")
@click.option("--exclude-lean-runtime", is_flag=True, help="With --version-compatible: do not embed the lean runtime.")
@click.option("--hardware-compatibility", type=click.Choice(list(HARDWARE_LEVELS)), default="none",
              show_default=True, help="Run the engine on other GPUs of the same (or Ampere+) architecture.")
@click.option("--optimization-level", type=click.IntRange(0, 5),
              help="Builder optimization level 0..5 (TensorRT default 3).")
@click.option("--workspace-mib", type=_POS, help="Workspace memory pool limit in MiB.")
@click.option("--tensorrt", "trt_module", type=click.Choice(TRT_MODULES), default="tensorrt",
              show_default=True, help="tensorrt (server GPUs, Jetson) or tensorrt_rtx (RTX GPUs; builds without one).")
@click.option("--compute-capability", "compute_capabilities", multiple=True,
              help="tensorrt_rtx: the RTX architectures to compile for (SM75, SM80, SM86, SM89, SM120, CURRENT; "
                   "repeatable). Default: every one TensorRT-RTX knows.")
def build(onnx_file, min_shape, opt_shape, max_shape, out, plugin, timing_cache, fp16, version_compatible,
          exclude_lean_runtime, hardware_compatibility, optimization_level, workspace_mib, trt_module,
          compute_capabilities):
    """Build a TensorRT engine from ONNX_FILE (the plugin loaded for QMambaSelectiveScan nodes)."""
    cfg = BuildConfig(onnx_file, _profile(min_shape, opt_shape, max_shape), plugin=plugin, timing_cache=timing_cache,
                      fp16=fp16, version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime,
                      hardware_compatibility=hardware_compatibility, optimization_level=optimization_level,
                      workspace_mib=workspace_mib, tensorrt=trt_module,
                      compute_capabilities=tuple(compute_capabilities))
    m = build_engine(cfg, out, command=_command_line())
    click.echo(f"{out}/model.engine: {m['engine_bytes'] / 1e6:.2f} MB, {m['tensorrt']['module']} "
               f"{m['tensorrt']['version']}, built in {m['build_seconds']:.1f} s")


@main.command()
@_model_option("or use --compare.")
@click.option("--engine", type=click.Path(dir_okay=False), help="Same as --model, for a TensorRT engine.")
@click.option("--onnx", "onnx_file", type=click.Path(dir_okay=False), help="Same as --model, for an ONNX.")
@click.option("--torch", "torch_ckpt", type=click.Path(dir_okay=False), help="Same as --model, for a checkpoint.")
@click.option("--compare", nargs=2, type=click.Path(dir_okay=False), metavar="A.json B.json",
              help="Print two bench results side by side with ratios B / A (runs nothing).")
@click.option("--shape", default="1x3x64x64", show_default=True, help="Input NxCxHxW.")
@click.option("--warmup", type=_NONNEG, default=3, show_default=True)
@click.option("--iterations", type=_POS, default=20, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cuda for engines, else cpu.")
@click.option("--threads", type=_NONNEG, default=0, show_default=True, help="CPU threads (0: the library's default).")
@click.option("--cuda-graph", is_flag=True, help="Engines: replay the enqueue as a CUDA graph.")
@click.option("--plugin", type=click.Path(dir_okay=False), help="Engines: the plugin library (default: as build).")
@click.option("--tensorrt", "trt_module", type=click.Choice(TRT_MODULES), default=None,
              help="Engines: the TensorRT module (default: the one engine.json records, else tensorrt).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result as JSON.")
def bench(model, engine, onnx_file, torch_ckpt, compare, shape, warmup, iterations, device, threads, cuda_graph,
          plugin, trt_module, json_out):
    """Latency of any model (checkpoint, bundle, ONNX, engine) in one JSON schema; or --compare two results."""

    chosen = [(flag, v, kind) for flag, v, kind in (("--model", model, None), ("--engine", engine, "engine"),
                                                    ("--onnx", onnx_file, "onnx"), ("--torch", torch_ckpt, None),
                                                    ("--compare", compare, None)) if v]
    if len(chosen) != 1:
        raise OptionError(f"bench: pass exactly one of --model, --engine, --onnx, --torch, --compare (got "
                          f"{', '.join(flag for flag, _, _ in chosen) or 'none'})")
    flag, path, expected = chosen[0]
    if compare:
        click.echo(b.compare_table(b.load_result(compare[0]), b.load_result(compare[1])))
        return
    found, _ = artifact_kind(path)
    _check_json(json_out, model=path)
    if flag == "--torch" and found not in ("checkpoint", "bundle"):
        raise OptionError(f"--torch {path} is a{'n' if found[0] in 'aeiou' else ''} {found}; --torch runs "
                          f"checkpoints and bundles in PyTorch (pass --model for any kind)")
    settings = b.BenchSettings(shape=b.parse_shape(shape), warmup=warmup, iterations=iterations, threads=threads,
                               device=device or ("cuda" if found == "engine" else "cpu"), cuda_graph=cuda_graph)
    result = b.bench(path, settings, kind=expected, plugin=plugin, tensorrt=trt_module)
    data = result.as_dict()
    lat, thr = data["latency_ms"], data["throughput"]
    shapes = f"{'x'.join(map(str, settings.shape))} -> {'x'.join(map(str, data['output']['shape']))}"
    click.echo(f"{data['backend']} {shapes}: "
               f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms; "
               f"{thr['images_per_s']:.2f} images/s, {thr['output_megapixels_per_s']:.3f} MP/s")
    for note in data["notes"]:
        click.echo(f"note: {note}")
    if json_out:
        write_json(json_out, data)


@main.command()
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--target", type=click.Choice(list(PACKAGE_TARGETS)), required=True)
@_profile_options
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write (and FOLDER.tar.gz beside it); "
              "default out/package/qmamba-TARGET.")
def package(onnx_file, target, min_shape, opt_shape, max_shape, out):
    """Folder + tarball to build and check the engine on a Jetson: ONNX, plugin sources, scripts, references."""

    out = out or f"out/package/qmamba-{target}"
    m = make_package(onnx_file, target, out, _profile(min_shape, opt_shape, max_shape), command=_command_line())
    click.echo(f"{out}/ and {out}.tar.gz: {len(m['files'])} files for {target} (sm_{m['target']['cuda_arch']}); "
               f"on the device: ./build_engine.sh && ./check_parity.sh")


if __name__ == "__main__":  # pragma: no cover
    main()
