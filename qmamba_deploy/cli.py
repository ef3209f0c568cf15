"""`qmamba-deploy` command line: one small function per subcommand, no logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import QMambaError


class _Group(click.Group):
    """Prints user errors (QMambaError) as one line, exit status 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QMambaError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


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
    from .inspect import describe_checkpoint, format_summary

    summary = describe_checkpoint(checkpoint, arch=arch, **_parse_kwargs(kwargs))
    click.echo(format_summary(summary))
    if json_out:
        from .manifest import write_json

        write_json(json_out, summary)


@main.command()
def presets():
    """List the named presets (every released configuration) with parameter counts."""
    from .inspect import preset_table

    click.echo(preset_table())


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Weights (.pth/.safetensors); default: the embedded model in models/.")
@click.option("--input", "input_", default="builtin", show_default=True,
              help="An image, a folder of images, or 'builtin' (sample photos from scikit-image).")
@click.option("--output", default="out/restore", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the restored PNGs.")
@click.option("--arch", help="Official class name or preset (default: detected).")
@click.option("--kwarg", "kwargs", multiple=True, help="Constructor override name=value (repeatable).")
@click.option("--tile", type=int, default=256, show_default=True,
              help="Tile size in input pixels for large images (0: whole image at once).")
@click.option("--overlap", type=int, default=16, show_default=True, help="Tile overlap in input pixels.")
@click.option("--bit-depth", type=click.Choice(["auto", "8", "16"]), default="auto", show_default=True,
              help="Output PNG bit depth (auto: as the input).")
@click.option("--suffix", default="", help="Appended to each output file stem.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, ...).")
def restore(checkpoint, input_, output, arch, kwargs, tile, overlap, bit_depth, suffix, device):
    """Restore images with a model (super-resolution, denoising or JPEG removal)."""
    from .checkpoints import load_model
    from .data.builtin import restore_samples
    from .data.io import list_images
    from .defaults import default_checkpoint
    from .restore import restore_files

    if tile and overlap >= tile:
        raise click.BadParameter(f"{overlap} must be smaller than --tile {tile}", param_hint="--overlap")
    ckpt = checkpoint or default_checkpoint()
    model = load_model(ckpt, arch=arch, **_parse_kwargs(kwargs)).to(device)
    sources = restore_samples() if input_ == "builtin" else list_images(input_)
    results = restore_files(model, sources, output, tile=tile or None, overlap=overlap,
                            bit_depth=None if bit_depth == "auto" else int(bit_depth), suffix=suffix, device=device)
    click.echo(f"model: {model.arch_name} x{model.upscale} from {ckpt}")
    for r in results:
        notes = f"  ({'; '.join(r.notes)})" if r.notes else ""
        click.echo(f"{r.source} {r.input_size[1]}x{r.input_size[0]} -> {r.output} "
                   f"{r.output_size[1]}x{r.output_size[0]}{notes}")


if __name__ == "__main__":  # pragma: no cover
    main()
