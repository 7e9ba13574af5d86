"""Training scale on real data: whole images shrunk to the step's size, or crops of larger ones.

ISBI 2012 membranes (bench/isbi.py: 18 train, 6 val, 6 test images of 512×512) and the baseline
U-Net of bench/search_quality.py (CE, AdamW, flips), trained for --epochs epochs at each of
--sizes, every image resized to SIDE×SIDE. With --crop C, a step trains on a random C×C window
of each resized image (`aug.crop`), so every size costs a step what C×C pixels cost; validation
and the test score see whole images. Each model is scored by `segsearch evaluate` on the test
split at 512×512. Wall time includes start-up and validation (on whole images, every epoch).

    python bench/scale.py [--sizes 128,256,512] [--crop 128] [--epochs 30] [--seeds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from isbi import ingest_isbi
from search_quality import baseline_space, run, sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sides, default=[128, 256, 512], help="image sides")
    parser.add_argument("--crop", type=int, default=None, help="train on CROP×CROP windows")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segsearch-scale-") as tmp:
        dataset = f"{tmp}/isbi"
        splits = ingest_isbi(dataset)
        print(f"ISBI 2012: {splits}; {vars(args)}", flush=True)
        print(f"{'size':>5} {'crop':>5} {'test mIoU':>16} {'best val':>8} {'wall s':>7}")
        for side in args.sizes:
            crop = args.crop if args.crop and args.crop < side else None
            tests, vals, walls = [], [], []
            for seed in range(args.seeds):
                raw = baseline_space(
                    f"scale-{side}-{crop}-{seed}",
                    seed=seed,
                    image_epochs=args.epochs * splits["train"],
                    size=side,
                    on="train",
                    splits=splits,
                )
                if crop:
                    raw["fixed"]["aug.crop"] = [crop, crop]
                outcome = run("baseline", raw, dataset=dataset, tmp=tmp, size=side, splits=splits)
                tests.append(outcome.test_miou)
                vals.append(outcome.best_val)
                walls.append(outcome.wall_s)
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            print(
                f"{side:>5} {crop or '-':>5} {statistics.mean(tests):>8.4f} ± {spread:.4f} "
                f"{statistics.mean(vals):>8.4f} {statistics.mean(walls):>7.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
