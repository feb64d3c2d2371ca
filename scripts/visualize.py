"""Draw predictions: bird's-eye views, the six cameras with projected 3D boxes, scene animations, metric curves.

    python scripts/visualize.py --config bev_nano --checkpoint runs/.../last.ckpt --scene scene-0081 --out viz/
    python scripts/visualize.py --config bev_tiny --checkpoint CKPT --data-root data/nuscenes --version v1.0-mini \\
        --sample 3e8750f331d7499e9b5123e9eb70f2e2 --score-threshold 0.4
    python scripts/visualize.py --results runs/.../results_nusc.json --scene scene-0082 --curves --out viz/
    python scripts/visualize.py --metrics-dir runs/.../eval/last-synthetic_val --out viz/   # curves of an evaluation

Predictions come from a model (--config, --checkpoint; it streams over the scene from its first frame) or from a
nuScenes results JSON (--results; no model). Per keyframe: <scene>_<frame>_<token>_bev.png (ego at the centre,
forward up, lidar points, GT filled and predictions outlined in class colours with heading and velocity arrows),
..._cameras.png (front-left, front, front-right over back-left, back, back-right with the 3D boxes) and
..._frame.png (both side by side); a scene also gets <scene>.mp4 (or .gif). --curves scores the results file with
the devkit and renders its PR and TP-error curves into <out>/curves/. Without --data-root the embedded synthetic
set is used (written on first use, as scripts/train.py does).
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import sys

from bevdeform.visualize import visualize


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="the model's config (name or path), with --checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--checkpoint", default=None, help="the model's weights (random without)")
    parser.add_argument("--results", default=None, metavar="FILE", help="a nuScenes results JSON instead of a model")
    parser.add_argument("--data-root", default=None, help="nuScenes data root (default: the embedded synthetic set)")
    parser.add_argument("--version", default=None, help="nuScenes version folder, e.g. v1.0-mini")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--scene", default=None, help="scene name or token: every keyframe and an animation")
    target.add_argument("--sample", default=None, metavar="TOKEN", help="one keyframe")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="predictions below are not drawn")
    parser.add_argument("--bev-range", type=float, default=55.0, help="metres from the ego to the BEV image edge")
    parser.add_argument("--bev-size", type=int, default=800, help="BEV image side in pixels")
    parser.add_argument("--tile-width", type=int, default=480, help="camera tile width in pixels")
    parser.add_argument("--animation", default="mp4", choices=("mp4", "gif", "none"), help="scene animation format")
    parser.add_argument("--fps", type=float, default=2.0, help="animation frames per second (keyframes are 2 Hz)")
    parser.add_argument("--curves", action="store_true", help="score --results and render the devkit's curves")
    parser.add_argument("--metrics-dir", default=None,
                        help="render the curves of an evaluation folder (metrics_summary.json, metrics_details.json)")
    parser.add_argument("--device", default="cpu", help="where the model runs")
    parser.add_argument("--out", default="viz", help="output folder (default ./viz)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written = visualize(args.out, config=args.config, checkpoint=args.checkpoint, overrides=args.overrides,
                            results=args.results, data_root=args.data_root, version=args.version, scene=args.scene,
                            sample=args.sample, score_threshold=args.score_threshold, range_m=args.bev_range,
                            bev_size_px=args.bev_size, tile_width_px=args.tile_width,
                            animation=None if args.animation == "none" else args.animation, fps=args.fps,
                            curves=args.curves, metrics_dir=args.metrics_dir, device=args.device,
                            log=lambda message: print(message, file=sys.stderr))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
