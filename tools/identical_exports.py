"""Do two versions of the code write the same bytes? Exports a fixed set of models and records the
sha256 of every model.onnx and bundle.safetensors; with --compare, checks them against a record
made by another checkout (e.g. before a refactoring).

    python3 tools/identical_exports.py --out /tmp/exports-new --json new.json --compare old.json

Cases: the embedded default (x2, W8A8 minmax, plugin scan); the real MambaIRv2-light x4 weights
(../shared/checkpoints) W8A8 with the plugin scan and with the portable scan; and W4A4 with INT4
MatMul weights. Validation is off (it writes reports, not models). Run both checkouts with the same
--out path: the bundle's provenance records the command's paths.

Besides each file's sha256 it records the sha256 of the ONNX with torch's per-node debug metadata
removed (``pkg.torch.onnx.*`` stack traces name the source files and line numbers of the checkout
that traced the model, so they differ between any two checkouts); --compare compares that
canonical form and the bundles. (Exports made since 2026-11-29 carry no such metadata and write
safetensors headers in a fixed order, so their raw files compare equal too.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "checkpoints" / "mambairv2_light_x4.safetensors"
CASES = {
    "default_w8a8": {"checkpoint": "@default"},
    "x4_w8a8_plugin": {"checkpoint": str(REAL)},
    "x4_w8a8_portable": {"checkpoint": str(REAL), "scan": "portable"},
    "x4_w4a4_int4": {"checkpoint": str(REAL), "w_bits": 4, "a_bits": 4, "int4_weights": True},
}
FILES = ("model.onnx", "bundle.safetensors")
COMPARED = ("onnx_canonical", "bundle.safetensors")


def canonical_onnx(path: Path) -> str:
    """sha256 of the graph without node / value debug metadata (the model-level metadata stays)."""
    import onnx

    model = onnx.load(str(path))
    stack = [model.graph]
    while stack:
        g = stack.pop()
        del g.metadata_props[:]
        for v in (*g.value_info, *g.input, *g.output, *g.initializer):
            del v.metadata_props[:]
        for node in g.node:
            del node.metadata_props[:]
            stack += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            stack += [x for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for x in a.graphs]
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _export_api():
    """run_export and ExportConfig wherever this checkout keeps them."""
    try:
        from qmamba_deploy.jobs.export import ExportConfig, run_export
    except ImportError:  # checkouts before the jobs package
        from qmamba_deploy.export.job import ExportConfig, run_export
    return ExportConfig, run_export


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, help="write the checksums here")
    ap.add_argument("--compare", type=Path, help="checksums written by another checkout")
    ap.add_argument("--only", nargs="*", default=list(CASES))
    args = ap.parse_args()
    ExportConfig, run_export = _export_api()
    # the embedded default, copied to a path outside the checkout (bundles record the checkpoint's path)
    default = args.out / "inputs" / "mambairv2_tiny_x2.safetensors"
    default.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        default.with_suffix(suffix).write_bytes((ROOT / "models" / default.name).with_suffix(suffix).read_bytes())
    sums = {}
    for name in args.only:
        folder = args.out / name
        case = {k: str(default) if v == "@default" else v for k, v in CASES[name].items()}
        run_export(ExportConfig(validate=False, **case), folder)
        sums[name] = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}
        sums[name]["onnx_canonical"] = canonical_onnx(folder / "model.onnx")
        print(name, sums[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(sums, indent=1) + "\n")
    if args.compare:
        old = json.loads(args.compare.read_text())
        diff = [f"{n}/{f}" for n in sums for f in COMPARED if old.get(n, {}).get(f) != sums[n][f]]
        print("identical" if not diff else f"DIFFERENT: {', '.join(diff)}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
