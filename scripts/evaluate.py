"""Evaluate a bevdeform checkpoint with the nuScenes detection metrics (mAP, NDS, TP errors, AP per class).

    python scripts/evaluate.py --config bev_tiny --checkpoint runs/bev_tiny-.../checkpoints/last.ckpt
    python scripts/evaluate.py --config bev_tiny --checkpoint CKPT --data-root data/nuscenes --version v1.0-trainval
    python scripts/evaluate.py --config bev_tiny --checkpoint CKPT --devices 4      # scenes split whole over 4 processes
    python scripts/evaluate.py --config bev_tiny --results results_nusc.json        # score an existing results file

The streaming detector runs over each scene in order (the BEV carried from frame to frame); the results JSON
(global frame, at most 500 boxes per sample), metrics.json and the devkit's metrics_summary.json go to --out
(default: <run>/eval/<checkpoint>-<split>/). Without --data-root the embedded synthetic set is used.
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import sys

from bevdeform.train import RunError, evaluate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with (name or path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_workers=2")
    parser.add_argument("--checkpoint", default=None, metavar="CKPT", help="a checkpoint written by scripts/train.py")
    parser.add_argument("--data-root", default=None, help="nuScenes data root (default: the embedded synthetic set)")
    parser.add_argument("--version", default=None, help="nuScenes version folder, e.g. v1.0-trainval")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the validation split)")
    parser.add_argument("--out", default=None, help="folder for the results and metrics")
    parser.add_argument("--results", default=None, metavar="FILE", help="score this results JSON (no model is run)")
    parser.add_argument("--devices", default="auto", help="devices per node (an int or auto)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    parser.add_argument("--precision", default=None, help="32-true, 16-mixed, bf16-mixed")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    try:
        evaluate(args.config, checkpoint=args.checkpoint, overrides=args.overrides, data_root=args.data_root,
                 version=args.version, split=args.split, out=args.out, results=args.results, devices=devices,
                 num_nodes=args.num_nodes, strategy=args.strategy, accelerator=args.accelerator,
                 precision=args.precision)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
