"""Train a bevdeform detector.

    python scripts/train.py --config bev_tiny                       # embedded synthetic nuScenes, written on first use
    python scripts/train.py --config bev_tiny --data-root data/nuscenes --version v1.0-trainval --devices 8
    python scripts/train.py --config bev_nano train.lr=3e-4 data.num_workers=2 --max-steps 500
    python scripts/train.py --config bev_tiny --resume runs/bev_tiny-20250101-120000/checkpoints/last.ckpt

Without --data-root the run uses the embedded synthetic nuScenes set (written under ./data/synthetic-<hash> on first
use, then reused). key=value arguments override config keys (dotted, values in YAML). The run folder (--out,
default runs/<config>-<time>) receives the resolved config, checkpoints (last.ckpt and the best by val/NDS),
TensorBoard and CSV logs and the results of every validation; the final metrics table is printed at the end.
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import sys

from bevdeform.train import RunError, train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config name in configs/ (bev_tiny, bev_nano, ...) or a path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    parser.add_argument("--data-root", default=None,
                        help="nuScenes data root (default: the embedded synthetic set); info files are made when absent")
    parser.add_argument("--version", default=None, help="nuScenes version folder, e.g. v1.0-trainval, v1.0-mini")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<config>-<time>; with --resume the "
                                                    "checkpoint's run folder)")
    parser.add_argument("--max-epochs", type=int, default=None, help="overrides train.epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="overrides train.max_steps (optimiser steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="overrides data.train_batch_size (per process)")
    parser.add_argument("--devices", default="auto", help="devices per node (an int or auto)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ddp_find_unused_parameters_true, ...")
    parser.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    parser.add_argument("--precision", default=None, help="overrides train.precision: 32-true, 16-mixed, bf16-mixed")
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue a run from its checkpoint")
    parser.add_argument("--init-weights", default=None, metavar="CKPT",
                        help="fine-tune: start a new run from these weights of the same model (e.g. a converted "
                             "BEVFormer checkpoint), with a fresh optimiser and schedule")
    parser.add_argument("--checkpoint-every-n-steps", type=int, default=200,
                        help="also write last.ckpt every this many optimiser steps (default 200)")
    parser.add_argument("--log-every-n-steps", type=int, default=10)
    parser.add_argument("--val-every-n-epochs", type=int, default=1,
                        help="validate every this many epochs (and always at the end)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    try:
        train(args.config, args.overrides, data_root=args.data_root, version=args.version, out=args.out,
              max_epochs=args.max_epochs, max_steps=args.max_steps, batch_size=args.batch_size, devices=devices,
              num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision, resume=args.resume,
              accelerator=args.accelerator, checkpoint_every_n_steps=args.checkpoint_every_n_steps,
              log_every_n_steps=args.log_every_n_steps, val_every_n_epochs=args.val_every_n_epochs,
              init_weights=args.init_weights)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
