"""A folder of natural colour photos for QAT, from what this machine has offline.

    python3 tools/natural_photos.py --out runs/photos [--add ../shared/images]

Writes scikit-image's natural colour photos that are not in the built-in eval
split (the stereo motorcycle pair) and copies the images of every ``--add``
folder beside them, so that `quantize --data runs/photos` (or
`tools/quant_results.py --data runs/photos`) trains on photos like the ones it is
scored on instead of the built-in train split, which is mostly gray textures,
retina and deep-sky images (docs/quantization.md, "Training photos"). An image
whose pixels are one of the eval photos (whole or its eval crop) is refused, so
the folder cannot leak the eval split into training. A ``photos.json`` lists
each file, where it came from and its sha256.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from qmamba_deploy.artifacts import sha256_file, staged_folder, write_text
from qmamba_deploy.data.builtin import eval_photo_in_file, sample_photo
from qmamba_deploy.data.io import list_images, write_image
from qmamba_deploy.errors import ImageError, OptionError

#: scikit-image's natural colour photos outside the eval split (the others are gray, textures,
#: microscopy, retina or deep sky)
SKIMAGE_PHOTOS = ("motorcycle_left", "motorcycle_right")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a new (or empty) folder")
    ap.add_argument("--add", nargs="*", default=[], help="folders whose images are copied in as well")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"--out {out} exists and is not an empty folder; name a new one")
    sources = []
    for folder in args.add:
        if not Path(folder).is_dir():
            sys.exit(f"--add {folder} is not a folder of images")
        try:
            sources += list_images(folder)
        except ImageError as exc:  # a folder without images
            sys.exit(f"--add: {exc}")
    for path in sources:  # every check before anything is written
        try:
            leak = eval_photo_in_file(path)
        except ImageError as exc:
            sys.exit(str(exc))
        if leak:
            sys.exit(f"{path} is the eval photo {leak}; training on it would score the model on its training "
                     f"data — leave it out of --add")
    names = [f"{name}.png" for name in SKIMAGE_PHOTOS] + [p.name for p in sources]
    if len(set(names)) != len(names):
        sys.exit("two images would have the same file name in --out; rename one of the --add images")

    listing = []
    try:  # written beside --out and renamed into place: no partial folder if a copy fails
        with staged_folder(out, owned=(*names, "photos.json")) as tmp:
            for name in SKIMAGE_PHOTOS:
                write_image(tmp / f"{name}.png", sample_photo(name).astype(np.float32) / 255.0)
                listing.append({"file": f"{name}.png", "source": f"skimage.data ({name})"})
            for path in sources:
                shutil.copyfile(path, tmp / path.name)
                listing.append({"file": path.name, "source": str(path)})
            for entry in listing:
                entry["sha256"] = sha256_file(tmp / entry["file"])
            write_text(tmp / "photos.json", json.dumps({"photos": listing}, indent=2) + "\n")
    except OptionError as exc:  # --out's parent cannot be written
        sys.exit(str(exc))
    except OSError as exc:  # a copy failed (disk full, an --add file vanished): nothing left at --out
        sys.exit(f"--out {out} was not written: {exc}")
    print(f"wrote {len(listing)} photos to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
