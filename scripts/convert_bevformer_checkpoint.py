"""Convert a published BEVFormer checkpoint (fundamentalvision/BEVFormer, mmcv format) into a bevdeform one.

    python scripts/convert_bevformer_checkpoint.py --checkpoint bevformer_tiny_epoch_24.pth --variant tiny \\
        --out bevformer_tiny.pth
    python scripts/evaluate.py --config bevformer_tiny --checkpoint bevformer_tiny.pth --data-root data/nuscenes

Every official tensor is mapped (bevdeform/compat/bevformer_v1.py ``convert_state_dict``; the box-code rows of the
yaw are rewritten for the devkit convention); an official key without a counterpart or a bevdeform parameter left
empty is an error that lists them all. The file is read with torch.load(weights_only=True); mmcv checkpoints whose
``meta`` holds Python objects need --trust-checkpoint (full unpickling: only for files you trust). The output
(written atomically) loads with load_model_weights and the --checkpoint of evaluate.py, visualize.py,
profile_latency.py and export.py, with --config bevformer_<variant>.
"""

from __future__ import annotations

import argparse
import sys

from bevdeform.compat.bevformer_v1 import VARIANTS, convert_checkpoint_file


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the official .pth (e.g. bevformer_tiny_epoch_24.pth)")
    parser.add_argument("--variant", required=True, choices=VARIANTS, help="which published model it is")
    parser.add_argument("--out", required=True, help="the bevdeform checkpoint to write (.pth)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the file in full when weights_only refuses its meta (runs its pickled code)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = convert_checkpoint_file(args.checkpoint, args.variant, args.out, trust_checkpoint=args.trust_checkpoint)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (bevdeform bevformer_v1 {args.variant}; use --config bevformer_{args.variant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
