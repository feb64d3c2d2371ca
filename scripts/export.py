"""Export the streaming detector for deployment: ONNX (MSDA as a custom op or decomposed) or torch.export.

    python scripts/export.py --config bev_tiny --checkpoint CKPT --format onnx --msda custom --out bev_tiny.onnx
    python scripts/export.py --config bev_nano --format onnx --msda decomposed --out nano.onnx --verify
    python scripts/export.py --config bev_nano --format torch-export --out nano.pt2

The exported module is one streaming frame at a fixed batch and image size (bevdeform/export.py, which also says
what stops the model's own forward from exporting and how the wrapper gets around it):
inputs images, ego2img, image_hw, ego_prev2curr, has_prev, prev_bev (+ can_bus for the published-checkpoint
configs bevformer_tiny/small/base); outputs boxes, scores, labels, valid, bev, num_visible_pairs. ``--msda custom`` emits bevdeform::MultiScaleDeformableAttn nodes for a TensorRT plugin;
``--msda decomposed`` emits standard ONNX (GridSample) that onnxruntime runs as it is (``--verify`` compares its
outputs with PyTorch's on an example frame). Needs the ``export`` extra: pip install -e ".[export]".
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import sys
from pathlib import Path

from bevdeform.export import (DEFAULT_OPSET, ExportableStreamingDetector, example_frame_inputs, export_onnx,
                              export_program, load_detector, run_onnxruntime)


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected HxW in pixels, e.g. 450x800") from None
    return height, width


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name or path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--checkpoint", default=None, help="weights (default: random, for trying the pipeline)")
    parser.add_argument("--format", default="onnx", choices=("onnx", "torch-export"))
    parser.add_argument("--out", default=None, help="output file (default: <config>-<msda>.onnx or <config>.pt2)")
    parser.add_argument("--msda", default="custom", choices=("custom", "decomposed"),
                        help="ONNX only: the op as a bevdeform-domain node, or standard ONNX ops")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--image-size", type=_image_size, default=None, metavar="HxW",
                        help="camera image size before padding (default: the config's data.image_size_hw)")
    parser.add_argument("--max-detections", type=int, default=None, help="fixed top-k (default: the config's)")
    parser.add_argument("--sca-pair-capacity", type=int, default=None,
                        help="length of spatial cross-attention's pair list (default: all N*Q pairs, exact for any "
                             "calibration)")
    parser.add_argument("--verify", action="store_true",
                        help="decomposed ONNX: run onnxruntime on an example frame and compare with PyTorch")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, model = load_detector(args.config, args.checkpoint, args.overrides)
        module = ExportableStreamingDetector(model, max_detections=args.max_detections,
                                             sca_pair_capacity=args.sca_pair_capacity)
        inputs = example_frame_inputs(cfg, image_size_hw=args.image_size)
        if args.format == "torch-export":
            import torch

            out = Path(args.out or f"{cfg.name}.pt2")
            program = export_program(module, inputs)
            torch.export.save(program, str(out))
            print(f"wrote {out} (torch.export, {sum(1 for _ in program.graph.nodes)} graph nodes)")
            return 0
        out = Path(args.out or f"{cfg.name}-{args.msda}.onnx")
        export_onnx(module, inputs, out, msda=args.msda, opset=args.opset)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, opset {args.opset}, MSDA {args.msda})")
        if args.verify:
            if args.msda != "decomposed":
                raise ValueError("--verify runs onnxruntime, which needs --msda decomposed (the custom op has no "
                                 "onnxruntime kernel here)")
            import numpy as np
            import torch

            from bevdeform.export import OUTPUT_NAMES, input_tuple, msda_implementation

            with torch.no_grad(), msda_implementation("reference"):
                expected = module(*input_tuple(module, inputs))
            got = run_onnxruntime(out, inputs)
            for name, value in zip(OUTPUT_NAMES, expected):
                difference = np.abs(got[name].astype(np.float64) - value.numpy().astype(np.float64)).max()
                print(f"  {name}: max |onnxruntime - torch| = {difference:.3g}")
    except ImportError as error:
        print(f"error: {error}; install the export extra: pip install -e '.[export]'", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
