#!/usr/bin/env python3
"""`./strait bench codecs [--json]`: strait's codecs next to the same
transformation written with PyTorch ops and a plain memcpy, one thread.

Runs build/bench/strait_bench_codecs (C++) and bench/codecs/torch_codecs.py in
this process, merges them, and prints a table (or one JSON object with
--json). Progress goes to stderr.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True, help="path to strait_bench_codecs")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--n", type=int, default=1 << 24, help="values (default 16M = 64 MiB)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, best is kept")
    ap.add_argument("--only", help="one codec name")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = ap.parse_args()

    cmd = [args.binary, "--n", str(args.n), "--reps", str(args.reps)]
    if args.only:
        cmd += ["--only", args.only]
    print(f"strait codecs: {args.n} values, best of {args.reps} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(proc.stdout)

    if not args.no_torch:
        import torch_codecs  # noqa: E402  (imports torch: slow)

        def progress(name):
            print(f"  torch baseline: {name}", file=sys.stderr, flush=True)

        torch_results = torch_codecs.measure(args.n, args.reps, args.only, progress)
        for r in result["results"]:
            r.update(torch_results.get(r["codec"], {}))

    for r in result["results"]:
        if "torch_encode_gbps" in r:
            r["encode_vs_torch"] = r["encode_gbps"] / r["torch_encode_gbps"]
            r["decode_vs_torch"] = r["decode_gbps"] / r["torch_decode_gbps"]
        r["encode_vs_memcpy"] = r["encode_gbps"] / result["memcpy_gbps"]

    if args.json:
        print(json.dumps(result))
        return

    print(f"n = {result['n']} float32 values, 1 thread, SIMD path: {result['simd']}, "
          f"memcpy {result['memcpy_gbps']:.2f} GB/s")
    head = f"{'codec':<24}{'enc GB/s':>9}{'dec GB/s':>9}{'acc GB/s':>9}{'bits/val':>9}" \
           f"{'torch enc':>10}{'torch dec':>10}{'enc x':>7}{'dec x':>7}{'enc/memcpy':>11}"
    print(head)
    print("-" * len(head))
    for r in result["results"]:
        te = r.get("torch_encode_gbps")
        td = r.get("torch_decode_gbps")
        print(f"{r['codec']:<24}{r['encode_gbps']:>9.2f}{r['decode_gbps']:>9.2f}"
              f"{r['decode_accumulate_gbps']:>9.2f}{r['bits_per_value']:>9.3f}"
              + (f"{te:>10.3f}{td:>10.3f}{r['encode_vs_torch']:>7.1f}{r['decode_vs_torch']:>7.1f}"
                 if te else f"{'-':>10}{'-':>10}{'-':>7}{'-':>7}")
              + f"{r['encode_vs_memcpy']:>11.2f}")
    print("GB/s are of float32 input (4 bytes a value); x = strait / PyTorch, same run.")


if __name__ == "__main__":
    main()
