"""Bad and hostile input, tried as a careful user (and an attacker) would -> docs/reliability.md.

    python3 tools/reliability.py [--out docs/reliability.md]

Each case builds its bad input in a scratch workspace (a tiny model, its W8A8 export, images),
runs one `qmamba-deploy` command in-process and records what happened: the exit status, the
first line the user sees, whether a traceback escaped, whether an input changed and whether
anything that must not exist (a partial output, a file a hostile name tried to create) does.
``tests/test_reliability.py`` runs the same cases in CI and fails when any outcome changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(upscale=2, in_chans=3, embed_dim=24, d_state=4, depths=[2], num_heads=[2], window_size=8, inner_rank=8,
            num_tokens=16, mlp_ratio=1.0, upsampler="pixelshuffledirect")


@dataclass
class Case:
    id: str
    kind: str            # the class of issue 14: scripts, overwrite, sentence, wrong-answer, partial
    what: str            # the bad input, in words
    argv: Callable[[Workspace], list[str]]
    exit: int = 2        # 2: refused (one sentence); 1: some work failed, the rest done
    protect: Callable[[Workspace], list[Path]] = lambda ws: []   # inputs that must be unchanged
    absent: Callable[[Workspace], list[Path]] = lambda ws: []    # must not exist afterwards
    expect: str = ""     # a phrase the message must contain


@dataclass
class Outcome:
    case: Case
    command: str
    exit: int
    message: str
    traceback: bool
    changed: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.exit == self.case.exit and not self.traceback and not self.changed and not self.present
                and self.case.expect.lower() in self.message.lower())


# ----------------------------------------------------------------------------- inputs


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


class Workspace:
    """The scratch inputs every case draws from (built once)."""

    def __init__(self, root: Path):
        import onnx
        import torch

        from qmamba_deploy import build_model, save_checkpoint
        from qmamba_deploy.jobs.export import ExportConfig, run_export

        self.root = root
        torch.manual_seed(0)
        model = build_model("MambaIRv2Light", **TINY).eval()
        self.ckpt = root / "model" / "tiny.safetensors"
        self.ckpt.parent.mkdir(parents=True)
        save_checkpoint(model, self.ckpt)
        self.export = root / "export"
        run_export(ExportConfig(checkpoint=str(self.ckpt), calib_batches=1, calib_patch=16, validate=False),
                   self.export)
        self.onnx = self.export / "model.onnx"
        rng = np.random.default_rng(0)
        self.images = root / "images"
        self.images.mkdir()
        cv2.imwrite(str(self.images / "a.png"), rng.integers(0, 256, (24, 28, 3), dtype=np.uint8))
        cv2.imwrite(str(self.images / "b.png"), rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        self.clash = root / "clash"
        self.clash.mkdir()
        for name in ("a.png", "a.jpg"):
            cv2.imwrite(str(self.clash / name), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        self.broken_folder = root / "broken-folder"
        self.broken_folder.mkdir()
        cv2.imwrite(str(self.broken_folder / "good.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        (self.broken_folder / "broken.png").write_text("not a png")
        self.bomb = png_with_size(root / "bomb.png", 100_000, 100_000)
        self.small = {}
        for w, h in ((1, 1), (7, 5)):
            self.small[(w, h)] = root / f"small_{w}x{h}"
            self.small[(w, h)].mkdir()
            cv2.imwrite(str(self.small[(w, h)] / "tiny.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        self.text = root / "notes.onnx"
        self.text.write_text("this is not a graph")
        self.empty = root / "empty.onnx"
        self.empty.write_bytes(b"")
        self.truncated = self._copy_export("truncated")
        data = self.truncated.read_bytes()
        self.truncated.write_bytes(data[: len(data) // 2])

        def tamper(name: str, edit: Callable) -> Path:
            path = self._copy_export(name)
            proto = onnx.load(str(path))
            edit(proto)
            onnx.save(proto, str(path))
            return path

        from qmamba_deploy.ops import contract

        def drop_attribute(proto):
            node = next(n for n in proto.graph.node if n.op_type == contract.OP_TYPE)
            kept = [a for a in node.attribute if a.name != "delta_softplus"]
            del node.attribute[:]
            node.attribute.extend(kept)

        def change_domain(proto):
            for n in proto.graph.node:
                if n.op_type == contract.OP_TYPE:
                    n.domain = "evil.domain"

        def drop_input(proto):
            del proto.graph.input[:]

        def hostile_input_name(proto):
            old = proto.graph.input[0].name
            new = "in$(touch PWNED)"
            proto.graph.input[0].name = new
            for n in proto.graph.node:
                for i, name in enumerate(n.input):
                    if name == old:
                        n.input[i] = new

        self.no_attr = tamper("no-attribute", drop_attribute)
        self.domain = tamper("domain", change_domain)
        self.no_input = tamper("no-input", drop_input)
        self.hostile = tamper("hostile-name", hostile_input_name)
        self.bad_json = self._copy_export("bad-json")
        self.bad_json.with_suffix(".json").write_text("{ not json")
        self.bad_limits = self._copy_export("bad-limits")
        m = json.loads(self.bad_limits.with_suffix(".json").read_text())
        m["limits"] = {"min_hw": ["a", -3], "max_hw": "x"}
        self.bad_limits.with_suffix(".json").write_text(json.dumps(m))
        self.manifests = {}
        for name, edit in (("kwargs-list", lambda m: m.update(kwargs=[1, 2])),
                           ("huge", lambda m: m["kwargs"].update(embed_dim=10 ** 9)),
                           ("not-json", None)):
            path = root / "manifests" / name / "tiny.safetensors"
            path.parent.mkdir(parents=True)
            shutil.copyfile(self.ckpt, path)
            if edit is None:
                path.with_suffix(".json").write_text("{{{")
            else:
                m = json.loads(self.ckpt.with_suffix(".json").read_text())
                edit(m)
                path.with_suffix(".json").write_text(json.dumps(m))
            self.manifests[name] = path
        self.nan = root / "nan" / "tiny.safetensors"
        self.nan.parent.mkdir()
        from safetensors.torch import save_file

        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["conv_first.weight"][0, 0, 0, 0] = float("nan")
        save_file(sd, str(self.nan))
        self.evil = root / "evil.pth"

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch PWNED",))

        torch.save({"params": Evil()}, self.evil)
        self.pickled = root / "pickled.pth"
        with open(self.pickled, "wb") as f:
            pickle.dump({"a": 1}, f)
        self.corrupt = root / "corrupt.safetensors"
        self.corrupt.write_bytes(b"\xff" * 100)
        self.a_file = root / "a-file"
        self.a_file.write_text("a file, not a folder")
        self.pwned = Path("PWNED")

    def _copy_export(self, name: str) -> Path:
        folder = self.root / "graphs" / name
        folder.mkdir(parents=True)
        for f in ("model.onnx", "model.json", "bundle.safetensors", "bundle.json"):
            shutil.copyfile(self.export / f, folder / f)
        return folder / "model.onnx"

    def out(self, name: str) -> Path:
        return self.root / "outputs" / name


# ----------------------------------------------------------------------------- the cases


def _cases() -> list[Case]:
    C = Case
    pw = lambda ws: [ws.pwned]  # noqa: E731
    return [
        # scripts
        C("package-hostile-input-name", "scripts", "graph input named `in$(touch PWNED)`, packaged for a Jetson",
          lambda ws: ["package", str(ws.hostile), "--target", "jetson-orin", "--out", str(ws.out("pkg"))],
          absent=lambda ws: [ws.pwned, ws.out("pkg"), ws.out("pkg.tar.gz")], expect="unsafe in the package's shell"),
        C("evil-pickle", "scripts", "a .pth whose pickle calls os.system",
          lambda ws: ["restore", "--model", str(ws.evil), "--output", str(ws.out("evil"))], absent=pw,
          expect="never unpickles"),
        # overwrite
        C("eval-json-is-checkpoint", "overwrite", "eval --json pointing at the checkpoint",
          lambda ws: ["eval", "--model", str(ws.ckpt), "--json", str(ws.ckpt), "--quiet"],
          protect=lambda ws: [ws.ckpt], expect="would destroy the input"),
        C("bench-json-is-onnx", "overwrite", "bench --json pointing at the ONNX",
          lambda ws: ["bench", "--model", str(ws.onnx), "--json", str(ws.onnx)], protect=lambda ws: [ws.onnx],
          expect="would destroy the input"),
        C("info-json-is-checkpoint", "overwrite", "info --json pointing at the checkpoint",
          lambda ws: ["info", str(ws.ckpt), "--json", str(ws.ckpt)], protect=lambda ws: [ws.ckpt]),
        C("validate-json-is-onnx", "overwrite", "validate --json pointing at the graph",
          lambda ws: ["validate", str(ws.onnx), "--json", str(ws.onnx)], protect=lambda ws: [ws.onnx]),
        C("lint-json-is-onnx", "overwrite", "lint --json pointing at the graph",
          lambda ws: ["lint", str(ws.onnx), "--json", str(ws.onnx)], protect=lambda ws: [ws.onnx]),
        C("restore-into-input-folder", "overwrite", "restore --output = the images' own folder",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--input", str(ws.images), "--output", str(ws.images)],
          protect=lambda ws: [ws.images / "a.png", ws.images / "b.png"], expect="would destroy the input"),
        C("restore-name-clash", "overwrite", "a.png and a.jpg in one folder (both become a.png)",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--input", str(ws.clash), "--output", str(ws.out("clash"))],
          absent=lambda ws: [ws.out("clash")], expect="would both be written"),
        C("quantize-out-holds-checkpoint", "overwrite", "quantize --out = the checkpoint's folder",
          lambda ws: ["quantize", "--checkpoint", str(ws.ckpt), "--method", "minmax", "--out", str(ws.ckpt.parent)],
          protect=lambda ws: [ws.ckpt], expect="holds the input"),
        C("export-out-holds-checkpoint", "overwrite", "export --out = the checkpoint's folder (export replaces it)",
          lambda ws: ["export", "--checkpoint", str(ws.ckpt), "--out", str(ws.ckpt.parent)],
          protect=lambda ws: [ws.ckpt], expect="holds the input"),
        C("fold-out-holds-checkpoint", "overwrite", "fold --out = the checkpoint's folder",
          lambda ws: ["fold", "--checkpoint", str(ws.ckpt), "--out", str(ws.ckpt.parent)],
          protect=lambda ws: [ws.ckpt]),
        C("train-out-holds-init", "overwrite", "train --init inside --out",
          lambda ws: ["train", "--arch", "mambairv2-tiny-x2", "--init", str(ws.ckpt), "--out", str(ws.ckpt.parent),
                      "--iters", "1"], protect=lambda ws: [ws.ckpt]),
        C("build-out-holds-onnx", "overwrite", "build --out = the ONNX's folder",
          lambda ws: ["build", str(ws.onnx), "--out", str(ws.export)], protect=lambda ws: [ws.onnx]),
        C("package-out-holds-onnx", "overwrite", "package --out = the ONNX's folder",
          lambda ws: ["package", str(ws.onnx), "--target", "jetson-orin", "--out", str(ws.export)],
          protect=lambda ws: [ws.onnx]),
        # sentences instead of tracebacks
        C("validate-text-as-onnx", "sentence", "a text file named .onnx",
          lambda ws: ["validate", str(ws.text)], expect="not a readable ONNX model"),
        C("validate-truncated-onnx", "sentence", "an ONNX cut in half",
          lambda ws: ["validate", str(ws.truncated)], protect=lambda ws: [ws.truncated]),
        C("validate-empty-onnx", "sentence", "an empty .onnx", lambda ws: ["validate", str(ws.empty)], expect="empty"),
        C("validate-scan-attribute-missing", "sentence", "a scan node without its delta_softplus attribute",
          lambda ws: ["validate", str(ws.no_attr)], expect="delta_softplus"),
        C("bench-scan-domain-changed", "sentence", "scan nodes moved to another domain",
          lambda ws: ["bench", "--model", str(ws.domain), "--iterations", "1"], expect="domain"),
        C("bench-graph-input-removed", "sentence", "a graph with its input removed",
          lambda ws: ["bench", "--model", str(ws.no_input), "--iterations", "1"]),
        C("validate-model-json-broken", "sentence", "model.json is not JSON",
          lambda ws: ["validate", str(ws.bad_json)], expect="not valid JSON"),
        C("bench-model-json-limits-garbage", "sentence", "model.json limits of the wrong types",
          lambda ws: ["bench", "--model", str(ws.bad_limits), "--iterations", "1"], expect="manifest is damaged"),
        C("info-kwargs-not-dict", "sentence", "a checkpoint manifest whose kwargs is a list",
          lambda ws: ["info", str(ws.manifests["kwargs-list"])], expect="damaged"),
        C("info-manifest-not-json", "sentence", "a checkpoint manifest that is not JSON",
          lambda ws: ["info", str(ws.manifests["not-json"])], expect="not valid JSON"),
        C("info-absurd-embed-dim", "sentence", "a manifest claiming embed_dim = 10^9 (a huge allocation)",
          lambda ws: ["info", str(ws.manifests["huge"])], expect="embed_dim"),
        C("restore-png-bomb", "sentence", "a 1 kB PNG whose header claims 100000 x 100000 pixels",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--input", str(ws.bomb), "--output", str(ws.out("bomb"))],
          absent=lambda ws: [ws.out("bomb") / "bomb.png"], expect="megapixels"),
        C("eval-7x5-image", "sentence", "eval on a 7x5 image",
          lambda ws: ["eval", "--model", str(ws.ckpt), "--data", str(ws.small[(7, 5)]), "--quiet"],
          expect="needs at least"),
        C("eval-1x1-image", "sentence", "eval on a 1x1 image",
          lambda ws: ["eval", "--model", str(ws.ckpt), "--data", str(ws.small[(1, 1)]), "--quiet"],
          expect="needs at least"),
        C("restore-tile-not-int", "sentence", "--tile abc",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--tile", "abc"], expect="--tile"),
        C("restore-kwarg-not-pair", "sentence", "--kwarg without '='",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--kwarg", "embed_dim"], expect="--kwarg"),
        C("train-patch-zero", "sentence", "train --patch 0",
          lambda ws: ["train", "--out", str(ws.out("train")), "--patch", "0"], expect="--patch"),
        C("train-batch-negative", "sentence", "train --batch -1",
          lambda ws: ["train", "--out", str(ws.out("train")), "--batch", "-1"], expect="--batch"),
        C("export-calib-zero", "sentence", "export --calib-batches 0",
          lambda ws: ["export", "--calib-batches", "0", "--out", str(ws.out("e"))], expect="--calib-batches"),
        C("restore-output-under-a-file", "sentence", "--output inside a path that is a file",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--input", str(ws.images), "--output",
                      str(ws.a_file / "out")], expect="is a file"),
        C("bench-shape-zero", "sentence", "bench --shape 1x3x0x8",
          lambda ws: ["bench", "--model", str(ws.ckpt), "--shape", "1x3x0x8"], expect="--shape"),
        C("restore-model-is-image", "sentence", "--model pointing at a PNG",
          lambda ws: ["restore", "--model", str(ws.images / "a.png")], expect="is an image, not a model"),
        C("restore-plain-pickle", "sentence", "a .pth that is a plain pickle, not torch.save",
          lambda ws: ["restore", "--model", str(ws.pickled), "--output", str(ws.out("p"))]),
        C("restore-corrupt-safetensors", "sentence", "a .safetensors of random bytes",
          lambda ws: ["restore", "--model", str(ws.corrupt), "--output", str(ws.out("c"))],
          expect="not a valid safetensors"),
        C("validate-checkpoint", "sentence", "validate given a checkpoint (not a graph)",
          lambda ws: ["validate", str(ws.ckpt)], expect="validate compares exported graphs"),
        C("bench-onnx-flag-on-checkpoint", "sentence", "bench --onnx given a checkpoint",
          lambda ws: ["bench", "--onnx", str(ws.ckpt)], expect="not an onnx"),
        # wrong answers with exit status 0 before
        C("lint-empty-onnx", "wrong-answer", "lint on an empty .onnx (said 'ok')",
          lambda ws: ["lint", str(ws.empty), "--no-parser"], expect="empty"),
        C("restore-nan-checkpoint", "wrong-answer", "a checkpoint with a NaN weight (restored to black)",
          lambda ws: ["restore", "--model", str(ws.nan), "--input", str(ws.images), "--output", str(ws.out("nan"))],
          absent=lambda ws: [ws.out("nan")], expect="conv_first.weight"),
        C("restore-overlap-negative", "wrong-answer", "--overlap -5 (accepted silently)",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--overlap", "-5"], expect="--overlap"),
        C("restore-tile-negative", "wrong-answer", "--tile -1 (blamed --overlap)",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--tile", "-1"], expect="--tile"),
        C("restore-kwarg-unknown", "wrong-answer", "--kwarg foo=1 (accepted silently)",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--kwarg", "foo=1", "--output", str(ws.out("k"))],
          expect="no argument 'foo'"),
        C("restore-kwarg-absurd", "wrong-answer", "--kwarg embed_dim=1000000000",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--kwarg", "embed_dim=1000000000", "--output",
                      str(ws.out("k2"))], expect="embed_dim"),
        # partial runs
        C("restore-folder-one-unreadable", "partial", "a folder with one unreadable image (restore)",
          lambda ws: ["restore", "--model", str(ws.ckpt), "--input", str(ws.broken_folder), "--output",
                      str(ws.out("partial"))], exit=1, expect="1 of the images failed"),
        C("eval-folder-one-unreadable", "partial", "a folder with one unreadable image (eval)",
          lambda ws: ["eval", "--model", str(ws.ckpt), "--data", str(ws.broken_folder), "--quiet"], exit=1,
          expect="1 of the images failed"),
    ]


CASES = _cases()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def run_case(case: Case, ws: Workspace) -> Outcome:
    """One case through the CLI in-process (as `qmamba-deploy ARGS` would run it)."""
    from click.testing import CliRunner

    from qmamba_deploy.cli import main

    before = {p: _digest(p) for p in case.protect(ws)}
    argv = case.argv(ws)
    cwd = os.getcwd()
    os.chdir(ws.root)  # a hostile name's payload would land here
    try:
        result = CliRunner().invoke(main, argv)
    finally:
        os.chdir(cwd)
    traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith(("error:", "Error:"))),
                   next((line for line in lines if line.startswith("failed:")), lines[-1] if lines else ""))
    if traceback:
        message = f"{type(result.exception).__name__}: {result.exception}"
    changed = [str(p) for p, h in before.items() if _digest(p) != h]
    present = [str(p) for p in case.absent(ws) if (ws.root / p).exists()]
    message = message.replace(str(ws.root) + "/", "").replace(str(ws.root), ".")
    return Outcome(case, argv[0], result.exit_code, message, traceback, changed, present)


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["# Reliability: bad and hostile input", "",
             "## Threat model", "",
             "- **Trusted:** the qmamba-deploy code and its dependencies, and the machine it runs on.",
             "- **Not trusted:** every file a command reads — checkpoints (`.pth` pickles, safetensors and their "
             "JSON manifests), bundles, ONNX graphs and their `model.json`, engines and `engine.json`, images, "
             "calibration folders — and every flag value. Such files come from downloads, colleagues and other "
             "tools; a hostile one may try to run code (pickles, names written into shell scripts), to exhaust "
             "memory (image headers, model sizes in manifests), or to make the tool destroy the user's own files.",
             "- **What we promise:** nothing from an input is executed (no unpickling beyond tensors: "
             "`weights_only=True`, safetensors; every value written into a generated script is one shell-quoted "
             "word and graph names are restricted to a safe set); no command writes over, or replaces a folder "
             "holding, one of its inputs; sizes are checked before anything large is decoded or allocated; bad "
             "input gets one sentence naming the file, tensor or flag and the fix, exit status 2, and no partial "
             "output; a run over many images finishes the good ones and exits 1 listing the failures; Ctrl-C "
             "exits 130 with nothing half-written kept; staging folders of killed runs are removed by the next "
             "run that writes the same folder.",
             "- **Not in scope:** a malicious TensorRT engine or plugin library (they are native code by design: "
             "build them yourself, on the device), and denial of service by a legitimately huge but well-formed "
             "model.", "",
             "## Bad inputs tried", "",
             "Command: `python3 tools/reliability.py` (the same cases run in CI: `tests/test_reliability.py`). "
             "Each case runs one `qmamba-deploy` command on a tiny model and its W8A8 export. Exit 2: refused with "
             "one sentence; exit 1: the other images were done. *Kept* means every protected input is unchanged "
             "and nothing that must not exist (partial output, a file a payload tried to create) does.", "",
             "| # | class | bad input | command | exit | what the user sees | kept | ok |",
             "|---|---|---|---|---:|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        msg = o.message.replace("|", "\\|")
        kept = "yes" if not o.changed and not o.present else "NO: " + ", ".join(o.changed + o.present)
        lines.append(f"| {i} | {o.case.kind} | {o.case.what} | `{o.command}` | {o.exit} | {msg[:260]} | {kept} | "
                     f"{'yes' if o.ok else 'NO'} |")
    passed = sum(o.ok for o in outcomes)
    lines += ["", f"{passed} of {len(outcomes)} cases behave as required; {sum(o.traceback for o in outcomes)} "
                  f"tracebacks."]
    return "\n".join(lines) + "\n"


def main() -> int:
    import warnings

    from qmamba_deploy.artifacts import write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        outcomes = []
        for case in CASES:
            outcome = run_case(case, ws)
            outcomes.append(outcome)
            print(f"{'ok ' if outcome.ok else 'BAD'} {case.id}: exit {outcome.exit}: {outcome.message[:150]}",
                  flush=True)
        write_text(args.out, markdown(outcomes))
    print(f"wrote {args.out}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
