"""Human-readable descriptions of checkpoints and presets (`info`, `presets`)."""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..artifacts import sha256_file
from ..checkpoints import load_model, read_checkpoint
from ..models import PRESETS, build_model, count_parameters
from ..quant import quantizers


def task_of(kwargs: dict[str, Any]) -> str:
    if int(kwargs.get("upscale", 1)) > 1:
        return f"super-resolution x{kwargs['upscale']}"
    return "JPEG artifact removal / denoising (grayscale)" if kwargs.get("in_chans", 3) == 1 else "denoising (color)"


def layer_summary(model: torch.nn.Module) -> OrderedDict[str, int]:
    """Parameters per top-level part (stem, each group, tail)."""
    parts: OrderedDict[str, int] = OrderedDict()
    for name, child in model.named_children():
        if name == "layers":
            for i, group in enumerate(child):
                parts[f"layers.{i} ({type(group).__name__})"] = count_parameters(group)
        else:
            n = count_parameters(child)
            if n:
                parts[name] = n
    return parts


def describe_checkpoint(path: str | os.PathLike, arch: str | None = None, **kwargs: Any) -> dict[str, Any]:
    sd, manifest = read_checkpoint(path)
    model = load_model(sd if manifest is None else path, arch=arch, **kwargs)
    card = model.card.replace(provenance={**model.card.provenance, "checkpoint": str(path)})
    scan = next((m for m in model.modules() if hasattr(m, "A_logs")), None)
    return {
        "checkpoint": str(path),
        "sha256": sha256_file(path),
        "bytes": Path(path).stat().st_size,
        "arch": card.arch,
        "arch_from": card.provenance.get("arch_from"),
        "kwargs": card.kwargs,
        "task": task_of(card.kwargs),
        "scale": int(model.upscale),
        "params": count_parameters(model),
        "tensors": len(sd),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in sd.values()}),
        "scan": {"d_state": int(scan.A_logs.shape[1]), "channels": int(scan.A_logs.shape[0])} if scan else None,
        "layers": dict(layer_summary(model)),
        "quantization": _quantization(model),
        "manifest": manifest,
    }


def _quantization(model) -> dict[str, Any] | None:
    qconfig = model.card.qconfig
    if qconfig is None:
        return None


    kinds = Counter(q.kind for _, q in quantizers(model))
    return {"qconfig": qconfig.as_dict(), "label": qconfig.label, "quantizers": dict(sorted(kinds.items())),
            "from": model.card.provenance.get("qconfig_from", "manifest")}


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"checkpoint  {s['checkpoint']}  ({s['bytes']:,} bytes, sha256 {s['sha256'][:16]}…)",
        f"arch        {s['arch']}  ({s['arch_from']})",
        f"task        {s['task']}",
        f"params      {s['params']:,}  in {s['tensors']} tensors ({', '.join(s['dtypes'])})",
        "kwargs      " + ", ".join(f"{k}={v}" for k, v in s["kwargs"].items()),
    ]
    if s.get("quantization"):
        q = s["quantization"]
        kinds = ", ".join(f"{n} {k}" for k, n in q["quantizers"].items())
        lines.append(f"quantized   {q['label']} ({q['from']}): {kinds}")
    if s["scan"]:
        lines.append(f"scan        d_state {s['scan']['d_state']}, {s['scan']['channels']} channels per scan op "
                     f"(first block)")
    lines.append("layers")
    width = max(len(k) for k in s["layers"])
    lines += [f"  {k:<{width}}  {v:>12,}" for k, v in s["layers"].items()]
    if s["manifest"] and s["manifest"].get("provenance"):
        lines.append(f"provenance  {s['manifest']['provenance']}")
    return "\n".join(lines)


def preset_table() -> str:
    rows = []
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            params = count_parameters(build_model(name))
        rows.append((name, preset.arch, f"{params:,}", preset.description))
    widths = [max(len(r[i]) for r in rows + [("preset", "class", "params", "")]) for i in range(3)]
    out = [f"{'preset':<{widths[0]}}  {'class':<{widths[1]}}  {'params':>{widths[2]}}  description"]
    out += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(out)
