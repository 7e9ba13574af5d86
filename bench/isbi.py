"""The ISBI 2012 membrane data (../shared/data/isbi2012-membrane) as a segsearch dataset.

The 30 labelled images are split with a fixed permutation into train, val and test folders
(symbolic links, nothing copied) and ingested with segsearch itself: grey 0 is `membrane`,
grey 255 is `cell`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segsearch.data.ingest import ingest

ISBI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "isbi2012-membrane"
CLASSES = "membrane,cell"
COLORS = "0;255"


def ingest_isbi(dest: str, *, val: int = 6, test: int = 6, seed: int = 0) -> dict[str, int]:
    """Ingest ISBI with `val` and `test` images held out (fixed by `seed`); images per split."""
    if not ISBI.is_dir():
        raise SystemExit(f"{ISBI}: not found; this benchmark needs the shared ISBI 2012 data")
    stems = sorted(p.stem for p in (ISBI / "images").glob("*.png"))
    order = np.random.default_rng(seed).permutation(len(stems))
    splits = {"test": order[:test], "val": order[test : test + val], "train": order[test + val :]}
    layout = Path(dest).with_name(Path(dest).name + "-layout")
    for split, indices in splits.items():
        for kind in ("images", "masks"):
            folder = layout / kind / split
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                name = f"{stems[index]}.png"
                (folder / name).symlink_to(ISBI / kind / name)
    ingest(layout / "images", layout / "masks", dest, classes=CLASSES, colors=COLORS)
    return {split: len(indices) for split, indices in splits.items()}
