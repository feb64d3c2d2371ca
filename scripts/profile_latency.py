"""Latency of the streaming detector as a vehicle runs it: batch 1, six cameras, a cached previous BEV.

    python scripts/profile_latency.py --config bev_nano --threads 2
    python scripts/profile_latency.py --config bev_tiny --threads 2 --iters 10 --warmup 2 --json tiny.json
    python scripts/profile_latency.py --config bev_tiny --compare-msda --threads 2       # reference vs native op
    python scripts/profile_latency.py --config bev_tiny --device cuda --precision fp16 --compile --cuda-graphs
    python scripts/profile_latency.py --config bev_tiny --checkpoint runs/.../last.ckpt --trace trace.json

Per stage (backbone, neck, temporal self-attention, spatial cross-attention, the rest of the encoder, decoder with
its head branches, top-k decoding, other) and end to end: median, p90 and p99 milliseconds over the timed frames,
FPS and peak memory, printed as a markdown table headed by the device, the date and the machine's load average.
Inputs are random images on the nuScenes camera rig (so spatial cross-attention sees the real visible pairs);
weights are random without --checkpoint (latency does not depend on them). See bevdeform/profiling.py for what
each number measures.
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import sys

from bevdeform.profiling import format_markdown, run_profile


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected HxW in pixels, e.g. 450x800") from None
    return height, width


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name (bev_nano, bev_tiny, ...) or path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--checkpoint", default=None, help="weights (default: random)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="autocast precision")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (emulates a CPU budget)")
    parser.add_argument("--image-size", type=_image_size, default=None, metavar="HxW",
                        help="camera image size before padding (default: the config's data.image_size_hw)")
    parser.add_argument("--iters", type=int, default=20, help="timed frames (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first (default 3)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the stage modules")
    parser.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (reduce-overhead)")
    parser.add_argument("--msda", default="auto", choices=("auto", "reference", "native"), help="MSDA op path")
    parser.add_argument("--compare-msda", action="store_true",
                        help="time the reference and the native MSDA path in one run and print their ratio")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the markdown table")
    parser.add_argument("--trace", default=None, metavar="FILE", help="write a torch.profiler Chrome trace")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run_profile(args.config, checkpoint=args.checkpoint, overrides=args.overrides, device=args.device,
                             precision=args.precision, threads=args.threads, image_size_hw=args.image_size,
                             iters=args.iters, warmup=args.warmup, compile_modules=args.compile,
                             cuda_graphs=args.cuda_graphs, msda=args.msda, compare_msda=args.compare_msda,
                             trace_path=args.trace, progress=lambda message: print(message, file=sys.stderr))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = format_markdown(report)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as stream:
            stream.write(table)
    if args.json:
        report.write_json(args.json)
        print(f"report written to {args.json}", file=sys.stderr)
    if args.trace:
        print(f"trace written to {args.trace}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
