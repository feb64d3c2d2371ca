"""Measure the training loader's throughput (samples/s) for several DataLoader worker counts.

Without --data-root a small synthetic nuScenes set is written to a temporary folder (and deleted afterwards), its
info files made with bevdeform.data.infos.create_infos, and the train split measured. Prints a markdown table.

Defaults are the bev_nano config's data (synthetic 320x180 images resized to 126x224, padded to 128x224, queue 2,
batch 2). Examples:
    python scripts/bench_data.py                                   # bev_nano
    python scripts/bench_data.py --synthetic-scale 1.0 --image-hw 450 800 --queue-length 3 --batch-size 1 \
        --synthetic-samples-per-scene 8                             # bev_tiny's images (1600x900 -> 800x450)
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bevdeform.data.datamodule import NuScenesDataModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="nuScenes-format data root; omitted: write a synthetic set to a temporary folder")
    parser.add_argument("--info-path", type=Path, default=None,
                        help="train info file (needed with --data-root)")
    parser.add_argument("--image-hw", type=int, nargs=2, default=(126, 224), metavar=("H", "W"),
                        help="size every image is resized to, pixels (padded to /32 afterwards)")
    parser.add_argument("--synthetic-scale", type=float, default=0.2,
                        help="synthetic image size as a fraction of 1600x900 (0.2 -> 320x180 on disk)")
    parser.add_argument("--synthetic-scenes", type=int, default=2)
    parser.add_argument("--synthetic-samples-per-scene", type=int, default=20)
    parser.add_argument("--queue-length", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--warmup-batches", type=int, default=2,
                        help="batches not timed (worker start-up, first file reads)")
    parser.add_argument("--no-photometric-aug", action="store_true")
    parser.add_argument("--image-pipelines", nargs="+", default=("bevdeform",),
                        choices=("bevdeform", "bevformer_v1_tiny", "bevformer_v1_caffe"),
                        help="data.image_pipeline values measured side by side (bevformer_v1_*: the official test "
                             "pipeline, full-size decode)")
    return parser.parse_args()


def measure(data_root: Path, info_path: Path, args: argparse.Namespace, num_workers: int,
            image_pipeline: str = "bevdeform") -> float:
    """Samples per second over ``args.batches`` batches after the warm-up ones."""
    data = NuScenesDataModule(
        data_root=data_root, train_info_path=info_path, val_info_path=None, image_size_hw=tuple(args.image_hw),
        queue_length=args.queue_length, train_batch_size=args.batch_size, num_workers=num_workers,
        persistent_workers=False, pin_memory=False, seed=0, photometric_aug=not args.no_photometric_aug,
        image_pipeline=image_pipeline)
    data.setup("fit")
    loader = data.train_dataloader()
    needed = args.warmup_batches + args.batches
    num_samples, start = 0, None
    while True:  # cycle the epochs when the dataset has fewer batches than needed
        for batch in loader:
            needed -= 1
            if start is None and needed < args.batches:
                start = time.perf_counter()  # the warm-up batches are done
            elif start is not None:
                num_samples += len(batch["sample_token"])
            if needed == 0:
                return num_samples / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if args.data_root is None:
            from bevdeform.data.infos import create_infos
            from bevdeform.data.synthetic import write_synthetic_nuscenes

            data_root = write_synthetic_nuscenes(
                Path(tmp), num_scenes=args.synthetic_scenes, num_val_scenes=1,
                samples_per_scene=args.synthetic_samples_per_scene, seed=0, scale=args.synthetic_scale,
                progress=False)
            version = next(p.name for p in Path(data_root).iterdir() if p.is_dir() and p.name.startswith("v1.0"))
            info_paths = create_infos(data_root, version, out_dir=tmp, progress=False)
            info_path = next(path for split, path in info_paths.items() if split.endswith("train"))
            source = f"synthetic, scale {args.synthetic_scale}"
        else:
            if args.info_path is None:
                raise SystemExit("--data-root needs --info-path (the train info file)")
            data_root, info_path, source = args.data_root, args.info_path, str(args.data_root)

        rows = [(pipeline, workers, measure(Path(data_root), info_path, args, workers, pipeline))
                for workers in args.workers for pipeline in args.image_pipelines]

    cpu = cpu_name()
    print(f"Train loader throughput, {datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} logical cores, "
          f"torch {torch.__version__}")
    print(f"data: {source}; images resized to {args.image_hw[0]}x{args.image_hw[1]} (HxW), queue {args.queue_length}, "
          f"batch {args.batch_size}, photometric aug {'off' if args.no_photometric_aug else 'on'}, "
          f"{args.batches} batches timed\n")
    print("| image pipeline | workers | samples/s | images/s |")
    print("|---|---:|---:|---:|")
    images_per_sample = 6 * args.queue_length
    for pipeline, workers, samples_per_s in rows:
        print(f"| {pipeline} | {workers} | {samples_per_s:.2f} | {samples_per_s * images_per_sample:.1f} |")


if __name__ == "__main__":
    main()
