"""Write the synthetic nuScenes dataset (bevdeform's embedded default data).

    python data_prep/make_synthetic_nuscenes.py --out data/synthetic
    python data_prep/make_synthetic_nuscenes.py --out /tmp/syn --scenes 2 --val-scenes 1 --samples-per-scene 4

Load it with the devkit: NuScenes('v1.0-synthetic', dataroot=OUT); splits `synthetic_train` / `synthetic_val`.
"""

import argparse
from typing import List, Optional

from bevdeform.data.synthetic import (DEFAULT_NUM_SCENES, DEFAULT_NUM_VAL_SCENES, DEFAULT_OBJECTS_PER_SAMPLE,
                                      DEFAULT_SAMPLES_PER_SCENE, DEFAULT_SCALE, write_synthetic_nuscenes)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data root to write (created if missing)")
    parser.add_argument("--scenes", type=int, default=DEFAULT_NUM_SCENES, help="training scenes")
    parser.add_argument("--val-scenes", type=int, default=DEFAULT_NUM_VAL_SCENES, help="validation scenes")
    parser.add_argument("--samples-per-scene", type=int, default=DEFAULT_SAMPLES_PER_SCENE,
                        help="keyframes per scene (2 Hz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help="image size as a fraction of 1600x900 (0.2 -> 320x180)")
    parser.add_argument("--objects-per-sample", type=int, default=DEFAULT_OBJECTS_PER_SAMPLE,
                        help="object density: about this many objects within 60 m of the ego")
    parser.add_argument("--extra-train-scenes", type=int, default=0,
                        help="more training scenes after the validation scenes (the validation scenes stay those "
                             "of --scenes / --val-scenes)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    write_synthetic_nuscenes(args.out, num_scenes=args.scenes, num_val_scenes=args.val_scenes,
                             samples_per_scene=args.samples_per_scene, seed=args.seed, scale=args.scale,
                             objects_per_sample=args.objects_per_sample, progress=not args.quiet,
                             extra_train_scenes=args.extra_train_scenes)


if __name__ == "__main__":
    main()
