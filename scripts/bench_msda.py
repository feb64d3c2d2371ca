"""Benchmark the MSDA op: reference vs native, side by side, forward and forward+backward.

    python scripts/bench_msda.py [--device cpu|cuda] [--dtype float32 bfloat16 ...] [--threads N]
                                 [--shapes full|cpu] [--repeats N] [--warmup N] [--json FILE]
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

use_passive_openmp_wait()  # before torch loads (bevdeform/runtime.py: OpenMP spin-wait on shared cores)

import argparse
import datetime
import json
import platform
import sys

import torch

from bevdeform import msda, msda_benchmark

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: float32 on cpu; float32 and bfloat16 on cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    parser.add_argument("--shapes", choices=("full", "cpu"), default=None,
                        help="full-size shapes, or the scaled-down CPU set (default by device)")
    parser.add_argument("--only", default=None, help="run only shapes whose name contains this text")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows and the environment to this file")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = [DTYPES[d] for d in (args.dtype or (["float32", "bfloat16"] if args.device == "cuda" else ["float32"]))]
    for dtype in dtypes:
        if not msda.native_available(args.device, dtype):
            parser.error(f"the native kernel does not serve {args.device}/{dtype}: {msda._native_problem}")
    shape_set = args.shapes or ("full" if args.device == "cuda" else "cpu")
    shapes = msda_benchmark.FULL_SHAPES if shape_set == "full" else msda_benchmark.CPU_SHAPES
    if args.only:
        shapes = [s for s in shapes if args.only.lower() in s.name.lower()]
    repeats = args.repeats or (50 if args.device == "cuda" else 5)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    copy_gbs = msda_benchmark.copy_bandwidth_gbs(args.device)
    print(f"# MSDA benchmark, {datetime.date.today()}, {args.device} ({device_name}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, median of {repeats} after {args.warmup} warm-up")
    if args.device == "cuda":
        print(f"# measured device copy bandwidth: {copy_gbs:.0f} GB/s")
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            row = msda_benchmark.bench_shape(shape, dtype, args.device, args.warmup, repeats)
            rows.append(row)
            print(f"  {row['name']:<40} {row['dtype']:<9} fwd x{row['speedup_fwd']:.1f}  "
                  f"fwd+bwd x{row['speedup_fwdbwd']:.1f}", file=sys.stderr, flush=True)
    print(msda_benchmark.markdown_table(rows, copy_gbs))
    if args.json:
        env = {"date": str(datetime.date.today()), "device": args.device, "device_name": device_name,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "copy_gbs": copy_gbs,
               "repeats": repeats, "warmup": args.warmup}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
