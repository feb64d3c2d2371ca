"""Convert nuScenes (or the synthetic set) to bevdeform info files, one JSON per split (docs/data-format.md).

    python data_prep/create_infos.py --data-root data/nuscenes --version v1.0-trainval [--out data/infos]
"""

import argparse

from bevdeform.data.infos import create_infos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding <version>/ (the tables) and the sensor files")
    parser.add_argument("--version", required=True, help="v1.0-mini, v1.0-trainval, v1.0-test or v1.0-synthetic")
    parser.add_argument("--out", default=None, help="folder for the info files (default: the data root)")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not open each image's header to check it exists and has its recorded size")
    parser.add_argument("--can-bus-root", default=None,
                        help="folder holding the CAN bus expansion's can_bus/ (default: the data root, else its "
                             "parent, when one has can_bus/); adds the 18-number CAN-bus vector BEVFormer's "
                             "checkpoints take (can_bus_v1)")
    args = parser.parse_args(argv)
    paths = create_infos(args.data_root, args.version, out_dir=args.out, check_images=not args.skip_image_check,
                         can_bus_root=args.can_bus_root)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
