"""Train the embedded default models with `qmamba-deploy train` and publish them to models/.

    python3 tools/train_default_models.py [--scales 2 4] [--runs runs/] [--publish-only]

For each scale this runs exactly the command written in ``COMMAND`` (so the
manifest and the model card carry the command a user can rerun), then
``qmamba-deploy eval`` on the built-in eval split, and writes
``models/mambairv2_tiny_x{s}.safetensors`` + ``.json`` (the run's own files)
and a model card ``models/mambairv2_tiny_x{s}.md`` with the measured figures.
A rerun resumes an interrupted training run (same --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

ITERS = 2500
COMMAND = ("qmamba-deploy train --arch mambairv2-tiny-x{scale} --out {out} --iters {iters} --lr 1e-3 "
           "--schedule cosine --patch 48 --batch 8 --val-every 500 --seed 0 --device cpu --quiet")


def _run(cmd: str, env: dict[str, str]) -> None:
    print(f"$ {cmd}", flush=True)
    subprocess.run(shlex.split(cmd), check=True, env=env, cwd=ROOT)


def _card(scale: int, manifest: dict, report: dict, command: str, eval_command: str, threads: int) -> str:
    cfg = manifest["provenance"]["config"]
    kw = manifest["kwargs"]
    m = report["mean"]
    rows = "\n".join(
        f"| {r['image']} | {r['input_size'][1]}x{r['input_size'][0]} | {r['psnr']:.4f} | {r['ssim']:.4f} | "
        f"{r['psnr_baseline']:.4f} | {r['ssim_baseline']:.4f} | {r['gain_db']:+.2f} |" for r in report["images"])
    return f"""# Model card: mambairv2_tiny_x{scale} (embedded default, x{scale})

- **What**: a reduced MambaIRv2-light x{scale} super-resolution model trained from scratch by this
  project's own `qmamba-deploy train`; {manifest['params']:,} parameters. It is the model `restore`,
  `eval` (and later `export`) use when no `--checkpoint` is given at x{scale}. It is small so that
  it trains on a CPU; it is not a replacement for the released MambaIRv2-light weights.
- **Arch**: `{manifest['arch']}` (preset `{cfg['arch']}`): embed_dim {kw['embed_dim']}, d_state {kw['d_state']},
  depths {kw['depths']}, heads {kw['num_heads']}, window {kw['window_size']}, inner_rank {kw['inner_rank']},
  num_tokens {kw['num_tokens']}, mlp_ratio {kw['mlp_ratio']}, {kw['upsampler']}; the full kwargs are in
  `mambairv2_tiny_x{scale}.json`. Trained with gumbel routing, shipped with deterministic routing.
- **Data**: the built-in train split (`--data builtin`: {', '.join(manifest['provenance']['train_images'])};
  scikit-image {_version('scikit-image')}), random {cfg['patch']}x{cfg['patch']} LR patches with flips and
  rotations, LR made by MATLAB-bicubic downscaling rounded to uint8.
- **Training**: {manifest['provenance']['iterations']} iterations, batch {cfg['batch']}, L1 loss, Adam
  (0.9, 0.99), lr {cfg['lr']:g} with a {cfg['schedule']} schedule, seed {cfg['seed']}, one process,
  {threads} CPU threads ({platform.processor() or platform.machine()}), torch {torch.__version__}.
- **Command** (rerun it to reproduce; the run resumes if interrupted):

      {command}

  Published with `python3 tools/train_default_models.py`, which runs that command, the evaluation
  below, and writes this card. Bitwise reproduction needs the same torch build and thread count.
- **Measured** on the built-in eval split (`{eval_command}`), {report['metric']},
  crop_border {report['crop_border']}; LR = MATLAB-bicubic downscale rounded to uint8:

| image | LR size | Y-PSNR | SSIM | bicubic Y-PSNR | bicubic SSIM | gain (dB) |
|---|---|---|---|---|---|---|
{rows}
| **mean** | | **{m['psnr']:.4f}** | **{m['ssim']:.4f}** | {m['psnr_baseline']:.4f} | \
{m['ssim_baseline']:.4f} | **{m['gain_db']:+.2f}** |

- **sha256**: `{manifest['sha256']}`
"""


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--iters", type=int, default=ITERS)
    ap.add_argument("--publish-only", action="store_true", help="Skip training; publish finished runs.")
    args = ap.parse_args()
    env = dict(os.environ)
    threads = int(env.get("OMP_NUM_THREADS", torch.get_num_threads()))
    for scale in args.scales:
        out = f"{args.runs}/default_x{scale}"
        command = COMMAND.format(scale=scale, out=out, iters=args.iters)
        if not args.publish_only:
            _run(command, env)
        report_path = ROOT / out / "eval_builtin.json"
        eval_command = (f"qmamba-deploy eval --checkpoint {out}/model.safetensors --data builtin "
                        f"--json {out}/eval_builtin.json --quiet")
        _run(eval_command, env)
        manifest = json.loads((ROOT / out / "model.json").read_text())
        report = json.loads(report_path.read_text())
        name = f"mambairv2_tiny_x{scale}"
        models = ROOT / "models"
        shutil.copyfile(ROOT / out / "model.safetensors", models / f"{name}.safetensors")
        shutil.copyfile(ROOT / out / "model.json", models / f"{name}.json")
        public_eval = eval_command.replace(f"--checkpoint {out}/model.safetensors",
                                           f"--checkpoint models/{name}.safetensors")
        public_eval = public_eval.replace(f" --json {out}/eval_builtin.json --quiet", "")
        (models / f"{name}.md").write_text(_card(scale, manifest, report, command, public_eval, threads))
        print(f"published models/{name}.* (mean gain {report['mean']['gain_db']:+.2f} dB)", file=sys.stderr)


if __name__ == "__main__":
    main()
