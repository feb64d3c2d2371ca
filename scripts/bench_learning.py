"""Learning benchmark (issue 14): train on the synthetic set, score held-out scenes with the devkit, with controls.

    python scripts/bench_learning.py                                   # bev_nano, 600 steps, both controls
    python scripts/bench_learning.py --steps 300 --controls scrambled data.queue_length=1 train.lr=1e-3
    python scripts/bench_learning.py --steps 5440 --extra-train-scenes 240 --controls none   # 320 training scenes
    python scripts/bench_learning.py --controls none --no-yaw-breakdown model.loss.bev_heatmap_weight=2.0
    python scripts/bench_learning.py --steps 0 --gt-bev-oracle-steps 600      # the decoder on ground-truth BEV only
    python scripts/bench_learning.py --steps 0 --temporal-oracle-steps 5000   # velocity through TSA, ground-truth BEV

Prints, per run (the learned run, then each control trained and evaluated the same way): the devkit's table (mAP,
NDS, mATE, mASE, mAOE, mAVE, mAAE, AP per class) on the held-out scenes, the learning curve (a validation every
--val-every-n-epochs epochs), the wall time and the load average; for the learned run the yaw errors of its
confident detections by class, camera and ego turn rate. Controls: 'scrambled' (every camera gets its neighbour's
extrinsics) and 'no_history' (every keyframe a scene start: no previous BEV in training or evaluation).
Run with OMP_NUM_THREADS set to the cores it may use; everything lands in --out (bench.json).
"""

from __future__ import annotations

import argparse
import sys

from bevdeform.learning_bench import main as bench_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-3")
    parser.add_argument("--config", default="bev_nano", help="a config name in configs/ or a path (default bev_nano)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run (default 600)")
    parser.add_argument("--data-root", default=None, help="a synthetic nuScenes root with infos (default: the "
                                                          "embedded set, written under --synthetic-parent)")
    parser.add_argument("--synthetic-parent", default="data")
    parser.add_argument("--extra-train-scenes", type=int, default=0,
                        help="training scenes added to the embedded set's 80 (same 8 held-out scenes; the larger set "
                             "is written under --synthetic-parent on first use, ~0.4 s per scene)")
    parser.add_argument("--out", default="runs/bench_learning", help="output folder (default runs/bench_learning)")
    parser.add_argument("--controls", nargs="+", default=["scrambled", "no_history"],
                        help="controls to run: scrambled, no_history, or none")
    parser.add_argument("--val-every-n-epochs", type=int, default=1, help="learning-curve spacing in epochs")
    parser.add_argument("--no-yaw-breakdown", action="store_true", help="skip the yaw error breakdown")
    parser.add_argument("--gt-bev-oracle-steps", type=int, default=0,
                        help="first train the decoder alone on ground-truth BEV features for this many steps (full "
                             "heading, then heading modulo pi) and score it (default 0: skip)")
    parser.add_argument("--temporal-oracle-steps", type=int, default=0,
                        help="first run the temporal oracle for this many steps: ground-truth BEV features without "
                             "velocity, one TSA layer over the previous BEV aligned / unaligned / absent, and velocity "
                             "in the features as the ceiling (default 0: skip)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    controls = [] if args.controls == ["none"] else args.controls
    try:
        bench_main(config=args.config, overrides=args.overrides, steps=args.steps, data_root=args.data_root,
                   out_dir=args.out, controls=controls, val_every_n_epochs=args.val_every_n_epochs,
                   yaw_breakdown=not args.no_yaw_breakdown, synthetic_parent=args.synthetic_parent,
                   gt_bev_oracle_steps=args.gt_bev_oracle_steps,
                   temporal_oracle_steps=args.temporal_oracle_steps, extra_train_scenes=args.extra_train_scenes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
