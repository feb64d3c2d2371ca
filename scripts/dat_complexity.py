"""Parameters and FLOPs of the DAT++ backbones at 224x224 beside the published numbers (docs/benchmarks.md), and
optionally DAT-T++ against ResNet-50 on the bev_tiny camera batch, timed alternately in one run.

    python scripts/dat_complexity.py            # tiny, small, base
    python scripts/dat_complexity.py --variants tiny --image-size 480
    OMP_WAIT_POLICY=PASSIVE python scripts/dat_complexity.py --variants tiny --side-by-side 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from bevdeform.models.backbone import ResNet
from bevdeform.models.dat import DAT, DAT_VARIANTS, dat_complexity


def side_by_side(frames: int, images: int = 6, height: int = 480, width: int = 800) -> None:
    """bev_tiny's backbone (ResNet-50, C5) and bev_tiny_dat's (DAT-T++, stages 1-3) on the same random camera batch,
    alternated frame by frame after one warm-up each, so that both see the same machine load."""
    models = {"resnet50 (bev_tiny)": ResNet(50, out_indices=(3,)).eval(),
              "dat_tiny (bev_tiny_dat)": DAT("tiny", out_indices=(1, 2, 3)).eval()}
    batch = torch.randn(images, 3, height, width)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model(batch)
        for _ in range(frames):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    load = os.getloadavg()
    print(f"\n{images} images {height}x{width}, {torch.get_num_threads()} threads, {frames} alternated frames, "
          f"load average {load[0]:.2f} after")
    for name, value in medians.items():
        print(f"- {name}: median {value:.0f} ms (all: {', '.join(f'{t:.0f}' for t in times[name])})")
    names = list(medians)
    print(f"- ratio {names[1]} / {names[0]}: {medians[names[1]] / medians[names[0]]:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DAT_VARIANTS), choices=list(DAT_VARIANTS))
    parser.add_argument("--image-size", type=int, default=224, help="square input side in pixels (default 224)")
    parser.add_argument("--side-by-side", type=int, default=0, metavar="FRAMES",
                        help="also time DAT-T++ against ResNet-50 on 6 images of 480x800, alternated, FRAMES each")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print("| variant | params (M, with classifier) | published params (M) | GMAC (FlopCounterMode) "
          "| GMAC, NATTEN-equivalent | published GFLOPs (MAC) |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        c = dat_complexity(variant, args.image_size)
        v = DAT_VARIANTS[variant]
        print(f"| DAT-{variant[0].upper()}++ | {c['params_m']:.2f} ({c['params_backbone_m']:.2f} backbone) | "
              f"{v.published_params_m:g} | {c['gmac']:.2f} | {c['natten_gmac']:.2f} | {v.published_gflops:g} |")
    if args.side_by_side > 0:
        side_by_side(args.side_by_side)
    return 0


if __name__ == "__main__":
    sys.exit(main())
