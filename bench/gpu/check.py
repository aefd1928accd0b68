"""`./strait gpu-check`: the CUDA checks and figures, on a machine with a GPU
(the lent H200: torch 2.11.0+cu130, no network), with the extension and
libraries `./strait gpu-bundle` carried in gpu/. Writes OUT/gpu-check.json
and OUT/gpu-check.txt (the lines it prints, the tables among them) after
every section, so a run cut short still leaves what it measured. Sections,
each timed; one that raises is recorded and the others still run:

1. what runs: the GPU, torch, the extension's build (does it hold device
   codecs, or stage CUDA tensors through the CPU), and where each shared
   library the process loaded came from;
2. identity: every codec's encode on a CUDA tensor gives the CPU encoder's
   payload bytes, and decode / decode-accumulate into CUDA tensors the CPU
   decoder's bits, at 1, 1,000,003 and 2^26 values;
3. the GPU tests of the suite (tests/python/test_ops.py -k 'cuda or gpu');
4. a two-site job (one worker per site on the one GPU, NCCL groups inside
   the sites, CUDA tensors) in every-step mode and DiLoCo: the replicas must
   end identical, and each worker's peak host memory must not grow by a
   model's size while it trains (no full-size host copy);
5. throughput on the GPU (CUDA events, best of 5): strait's int8 encode,
   top-k 1% encode and int8 decode-accumulate, whole (the payload to or
   from the host included) and their kernels alone (the profiler), next to
   the same transformation in torch ops and a device-to-device copy.

`--rehearse` runs all of it on the CPU of a machine without a GPU (the
"device" is the CPU, the groups are gloo, the model small): it checks this
script, the bundle's libraries and the job's config before a lent GPU's
minutes are spent on them, and measures nothing about GPUs. Its report says
`"rehearsal": true` on every line.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
sys.path.insert(0, os.path.join(ROOT, "bench", "codecs"))

import strait  # noqa: E402

PIPELINES = ["fp32", "fp16", "bf16", "int8", "int4", "int2", "int8(rounding=stochastic)", "qsgd", "sign",
             "topk(0.01) -> int8", "randomk(0.01) -> fp16", "lowrank(rank=4) -> fp16"]
SIZES = [1, 1000003, 1 << 26]


class Report:
    """The JSON object and the printed lines, both rewritten under OUT after
    every section."""

    def __init__(self, out, rehearsal):
        self.out = out
        self.data = {"time": time.time(), "rehearsal": rehearsal, "sections": {}}
        self.lines = []
        self.prefix = "gpu-check (rehearsal on the CPU)" if rehearsal else "gpu-check"

    def log(self, msg):
        line = f"{self.prefix}: {msg}"
        print(line, flush=True)
        self.lines.append(line)

    def save(self):
        with open(os.path.join(self.out, "gpu-check.json"), "w") as f:
            json.dump(self.data, f, indent=1)
        with open(os.path.join(self.out, "gpu-check.txt"), "w") as f:
            f.write("\n".join(self.lines) + "\n")

    def section(self, name, fn, *args):
        """Runs one section: True when its checks held; an exception is a
        failed section, recorded with its traceback's tail."""
        t0 = time.monotonic()
        try:
            ok = fn(self, *args)
        except Exception as e:  # noqa: BLE001 - reported, not hidden: the other sections still run
            ok = False
            self.log(f"{name}: FAILED with {type(e).__name__}: {e}")
            self.data.setdefault("errors", {})[name] = traceback.format_exc()[-4000:]
        self.data["sections"][name] = {"ok": bool(ok), "seconds": round(time.monotonic() - t0, 2)}
        self.save()
        return bool(ok)


def device(report):
    return "cpu" if report.data["rehearsal"] else "cuda"


def loaded_libraries():
    """The shared libraries this process mapped, by file."""
    seen = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            path = fields[-1] if len(fields) >= 6 else ""
            if ".so" in os.path.basename(path) and path not in seen:
                seen.append(path)
    return seen


def what_runs(report):
    info = strait.build_info()
    rehearsal = report.data["rehearsal"]
    gpu = "none (rehearsal)" if rehearsal else torch.cuda.get_device_name(0)
    libs = loaded_libraries()
    torch_dir = os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__))) + os.sep
    folder = os.path.dirname(os.path.realpath(strait.library_path)) + os.sep  # /proc/self/maps has real paths
    # ./strait gpu-bundle's folder: gpu/lib beside gpu/torch-version.
    stamp = os.path.join(os.path.dirname(os.path.dirname(folder)), "torch-version")
    bundled = os.path.exists(stamp)
    # What the extension needs beyond the system's C and C++ runtime and
    # torch's own must come from the bundle (a lent machine has none of it).
    ours = ("libzmq", "libprotobuf", "libyaml-cpp", "libsodium", "libpgm", "libnorm", "libgssapi", "libbsd",
            "libstrait")
    from_elsewhere = [p for p in libs if os.path.basename(p).startswith(ours) and not p.startswith(folder)]
    built_for = open(stamp).read().strip() if bundled else torch.__version__
    report.data["info"] = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "strait": info,
                           "library": strait.library_path, "bundle": bundled, "built_for_torch": built_for,
                           "python": sys.version.split()[0],
                           "libraries_from_its_folder": [p for p in libs if p.startswith(folder)],
                           "libraries_from_elsewhere": from_elsewhere,
                           "torch_libraries": len([p for p in libs if p.startswith(torch_dir)])}
    report.log(f"{gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}, "
               f"strait {info.get('version')} (CUDA part: {info.get('cuda')}, "
               f"device codecs: {info.get('device_codecs', '0')})")
    report.log(f"extension {strait.library_path}, built for torch {built_for}"
               + (f"; {len(report.data['info']['libraries_from_its_folder'])} libraries loaded from the bundle"
                  if bundled else " (not a bundle: its libraries come from the system)"))
    # The same release: "2.11.0+cu130" and "2.11.0" of a CUDA 13 torch are
    # one build (another CUDA major would not have loaded the extension).
    ok = built_for.split("+")[0] == torch.__version__.split("+")[0]
    if not ok:
        report.log(f"  BUILT FOR ANOTHER TORCH: {built_for}, here {torch.__version__}")
    if bundled:
        for p in from_elsewhere:
            report.log(f"  NOT FROM THE BUNDLE: {p}")
        ok = ok and not from_elsewhere
    # What a GPU run is for: codecs on the device (sm_90 for an H200).
    if bundled or not rehearsal:
        if not (info.get("cuda") and int(info.get("device_codecs", 0))):
            report.log("  NO DEVICE CODECS in this build: CUDA tensors would be staged through the CPU "
                       "(build where nvcc and a CUDA torch are found)")
            ok = False
        elif "90" not in str(info.get("cuda_archs", "")).split(","):
            report.log(f"  NOT BUILT FOR sm_90 (an H200): archs {info.get('cuda_archs')}")
            ok = False
    return ok


def lowrank_shape(n):
    side = math.isqrt(n)
    return (side, side) if side >= 8 else None


def identity(report, sizes):
    dev = device(report)
    rows = []
    g = torch.Generator().manual_seed(7)
    for n in sizes:
        x = torch.randn(n, generator=g) * 1e-2
        x[:: 4099] *= 100  # outliers, as the codec benchmark has them
        for pipe in PIPELINES:
            shape = (n,)
            if pipe.startswith("lowrank"):
                shape = lowrank_shape(n)
                if shape is None:
                    continue  # a factorization wants a matrix
            row = {"pipeline": pipe, "n": n, "shape": list(shape)}
            t0 = time.monotonic()
            try:
                host = x[: math.prod(shape)].reshape(shape).contiguous()
                dx = host.to(dev, copy=True)
                cpu = strait.encode(host, pipe, seed=11)
                gpu = strait.encode(dx, pipe, seed=11)
                row["encode_same_bytes"] = bool(torch.equal(cpu, gpu.cpu()))
                back_cpu = strait.decode(cpu, shape)
                back_gpu = strait.decode(cpu.to(dev, copy=True), shape)
                row["decode_on_device"] = back_gpu.device.type == dev
                row["decode_same_bits"] = bool(torch.equal(back_cpu.view(torch.int32),
                                                           back_gpu.cpu().view(torch.int32)))
                acc_cpu = torch.full(shape, 0.5)
                acc_gpu = acc_cpu.to(dev, copy=True)
                strait.decode_accumulate(acc_cpu, cpu, 0.25)
                strait.decode_accumulate(acc_gpu, cpu.to(dev, copy=True), 0.25)
                row["accumulate_same_bits"] = bool(torch.equal(acc_cpu.view(torch.int32),
                                                               acc_gpu.cpu().view(torch.int32)))
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                row["error"] = f"{type(e).__name__}: {e}"
            row["seconds"] = round(time.monotonic() - t0, 3)
            rows.append(row)
    report.data["identity"] = rows
    keys = ("encode_same_bytes", "decode_on_device", "decode_same_bits", "accumulate_same_bits")
    bad = [r for r in rows if r.get("error") or not all(r.get(k) for k in keys)]
    report.log(f"identity: {len(rows) - len(bad)} of {len(rows)} codec/size cases give the CPU's bytes and bits")
    report.log(f"  {'pipeline':28s} {'n':>10s}  encode  decode  accumulate")
    mark = {True: "same", False: "DIFFERS", None: "-"}
    for r in rows:
        report.log(f"  {r['pipeline']:28s} {r['n']:>10d}  {mark[r.get('encode_same_bytes')]:6s}  "
                   f"{mark[r.get('decode_same_bits')]:6s}  {mark[r.get('accumulate_same_bits')]:10s}"
                   + (f"  {r['error']}" if r.get("error") else ""))
    return not bad


def gpu_tests(report):
    """The GPU tests of the suite (tests/python/test_ops.py), where pytest exists."""
    if report.data["rehearsal"]:
        report.log("GPU tests: not on the CPU (they skip without a GPU)")
        report.data["gpu_tests"] = "rehearsal"
        return True
    try:
        import pytest  # noqa: F401
    except ImportError:
        report.log("GPU tests: pytest is not installed here; skipped (identity above covers the same ground)")
        report.data["gpu_tests"] = "no pytest"
        return True
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu",
                        os.path.join(ROOT, "tests", "python", "test_ops.py")],
                       capture_output=True, text=True, timeout=150, env=dict(os.environ))
    ok = p.returncode == 0
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    report.data["gpu_tests"] = {"ok": ok, "summary": tail[0], "output_tail": "" if ok else (p.stdout + p.stderr)[-3000:]}
    report.log(f"GPU tests (pytest -k 'cuda or gpu'): {tail[0]} ({time.monotonic() - t0:.1f} s)")
    if not ok:
        print((p.stdout + p.stderr)[-3000:])
    return ok


def timer(report):
    """Best of `reps` runs of fn, in seconds: CUDA events on the GPU, the
    wall clock in a rehearsal."""
    if report.data["rehearsal"]:
        from torch_codecs import best_seconds  # the codec benchmark's wall-clock best-of

        return lambda fn, reps=3: best_seconds(fn, reps)

    def events(fn, reps=5):
        best = float("inf")
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        return best
    return events


def device_seconds(fn, reps=3):
    """GPU time of one call of fn, from the profiler (best of reps): (kernels,
    copies) in seconds, kernels being everything but memcpy and memset (the
    ATen kernels strait launches count); None where the profiler recorded no
    device activity (no GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    best = None
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        kernels = copies = 0.0
        seen = False
        for e in prof.events():
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            seen = True
            us = e.time_range.elapsed_us()
            if e.name.startswith(("Memcpy", "Memset")):
                copies += us
            else:
                kernels += us
        if seen and (best is None or (kernels + copies) / 1e6 < sum(best)):
            best = (kernels / 1e6, copies / 1e6)
    return best


def throughput(report, n):
    """Each op timed whole (its payload crossing to or from the host
    included, as in use) and, on a GPU, its kernels alone (the profiler):
    the issue's targets are about the kernels, next to a device-to-device
    copy of the input and the same transformation in torch ops."""
    dev = device(report)
    timed = timer(report)
    x = (torch.randn(n, device=dev) * 1e-2).contiguous()
    gbytes = x.numel() * 4 / 1e9
    dst = torch.empty_like(x)
    copy = timed(lambda: dst.copy_(x))
    block = 256
    n_blocks = n // block * block

    def torch_int8():
        b = x[:n_blocks].view(-1, block)
        scale = b.abs().amax(1, keepdim=True) / 127
        return torch.round(b / scale).clamp_(-127, 127).to(torch.int8), scale

    def torch_topk():
        return torch.topk(x.abs(), max(1, n // 100), sorted=False)

    q, s = torch_int8()
    acc = torch.zeros_like(x)

    def torch_accumulate():
        acc[:n_blocks].view(-1, block).add_(q.float() * s, alpha=0.5)

    payload = strait.encode(x, "int8", seed=1).cpu()  # payloads arrive on the host
    cases = [
        ("int8 encode", lambda: strait.encode(x, "int8", seed=1), torch_int8),
        ("topk(0.01) -> int8 encode", lambda: strait.encode(x, "topk(0.01) -> int8", seed=1), torch_topk),
        ("int8 decode-accumulate", lambda: strait.decode_accumulate(acc, payload, 0.5), torch_accumulate),
    ]
    rows = []
    for name, ours, theirs in cases:
        t_ours, t_torch = timed(ours), timed(theirs)
        row = {"case": name, "op_gbs": gbytes / t_ours, "torch_gbs": gbytes / t_torch, "copy_gbs": gbytes / copy,
               "op_vs_torch": t_torch / t_ours, "op_vs_copy": copy / t_ours,
               "kernels_gbs": None, "kernels_vs_torch": None, "kernels_vs_copy": None, "device_copies_s": None}
        try:
            on_device = device_seconds(ours)
        except Exception as e:  # noqa: BLE001 - the whole-op figures stand without it
            row["profiler_error"] = f"{type(e).__name__}: {e}"
            on_device = None
        if on_device and on_device[0] > 0:
            kernels, copies = on_device
            row.update(kernels_gbs=gbytes / kernels, kernels_vs_torch=t_torch / kernels,
                       kernels_vs_copy=copy / kernels, device_copies_s=copies)
        rows.append(row)
    targets = {"int8 encode": "kernels of copy >= 80%", "topk(0.01) -> int8 encode": "kernels x torch >= 5",
               "int8 decode-accumulate": "kernels of copy >= 80%"}
    report.data["throughput"] = {"n": n, "copy_gbs": gbytes / copy, "rows": rows, "targets": targets}
    report.log(f"throughput at {n} float32 values on {dev} (a copy: {gbytes / copy:.1f} GB/s of input; "
               "op: the whole call, payload to or from the host included; kernels: on the GPU alone):")
    report.log(f"  {'case':28s} {'op GB/s':>9s} {'kernels':>9s} {'torch':>9s} {'op/copy':>8s} {'k/copy':>8s} "
               f"{'k x torch':>9s}  target")

    def cell(v, spec, width):
        return format("-" if v is None else format(v, spec), f">{width}s")

    for r in rows:
        report.log(f"  {r['case']:28s} {r['op_gbs']:9.1f} {cell(r['kernels_gbs'], '.1f', 9)} {r['torch_gbs']:9.1f} "
                   f"{r['op_vs_copy']:8.1%} {cell(r['kernels_vs_copy'], '.1%', 8)} "
                   f"{cell(r['kernels_vs_torch'], '.2f', 9)}  {targets[r['case']]}")
    return True  # figures, not checks: the targets are benchmarks


def mib(n):
    return f"{n / 2**20:.1f} MiB" if abs(n) < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


def job(report, mode, hidden):
    """Two sites, one worker each, on the one GPU: NCCL inside each site."""
    rehearsal = report.data["rehearsal"]
    with tempfile.TemporaryDirectory(prefix="strait-gpu-job-") as tmp:
        from strait.ports import free_port

        config = os.path.join(tmp, "job.yaml")
        sync = "sync: {mode: diloco, diloco: {sync_every: 5}}" if mode == "diloco" else "sync: {mode: every_step}"
        with open(config, "w") as f:
            f.write(f"""job: {{id: gpu-check}}
sites:
  - {{name: a, jurisdiction: CN, endpoint: "tcp://127.0.0.1:{free_port()}"}}
  - {{name: b, jurisdiction: SG, endpoint: "tcp://127.0.0.1:{free_port()}"}}
{sync}
compression: {{pipeline: "topk(0.1) -> int8", error_feedback: true}}
transport: {{insecure: true, heartbeat_ms: 100, peer_timeout_ms: 5000, round_deadline_s: 60, hard_deadline_s: 120}}
""")
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        # The launcher's own timeout stops its workers; the outer one is a
        # backstop for the launcher itself.
        cmd = [sys.executable, "-m", "strait.launch", config, "--timeout", "150", "--",
               sys.executable, os.path.join(HERE, "job_worker.py"),
               "--out", out, "--mode", mode, "--device", device(report), "--hidden", str(hidden)]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ))
            returncode, output = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            returncode = "timeout (180 s)"
            output = "".join(s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
                             for s in (e.stdout, e.stderr))
        results = [json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out))]
        same = returncode == 0 and len(results) == 2 and len({r["hash"] for r in results}) == 1
        # Peak host memory while training, beyond what the worker held after
        # a warm-up step of the bare model (CUDA context, NCCL, kernels):
        # less than the model's own size means no full-size host copy. On
        # the CPU the model is in host memory anyway: reported, not judged.
        # A runtime whose getrusage gives no peak (0) measures nothing:
        # reported as unmeasured (None), not as passed.
        measured = bool(results) and all(r["host_peak_before_bytes"] > 0 for r in results)
        lean = all(r["host_growth_bytes"] < r["model_bytes"] for r in results) if measured else None
        ok = same and (lean is not False or rehearsal)
        report.data.setdefault("jobs", {})[mode] = {
            "ok": ok, "identical": same, "host_memory_ok": lean, "seconds": time.monotonic() - t0,
            "results": results, "returncode": returncode, "output_tail": output[-3000:] if not ok else ""}
        growth = ", ".join(f"{r['site']} {mib(r['host_growth_bytes'])}" for r in results)
        model = mib(results[0]["model_bytes"]) if results else "?"
        report.log(f"two-site {mode} job on {device(report)} tensors: "
                   f"{'identical replicas' if same else 'FAILED (replicas differ or a worker failed)'} "
                   f"({time.monotonic() - t0:.1f} s); peak host memory grew by {growth or '?'} "
                   f"while training a {model} model"
                   + ("" if lean or rehearsal else
                      " -- NOT MEASURED (no peak from getrusage)" if lean is None else " -- A FULL-SIZE HOST COPY?"))
        if not ok:
            print(output[-3000:])
        return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rehearse", action="store_true",
                    help="run every section on the CPU (no GPU needed): checks the script, not the GPU")
    ap.add_argument("--sizes", help="comma-separated value counts for the identity section "
                                    f"(default {','.join(map(str, SIZES))}; a rehearsal: 1,4099,65536)")
    ap.add_argument("--hidden", type=int, help="the job's model width (default 8192 on a GPU: 69M parameters; "
                                               "a rehearsal: 64)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = Report(args.out, args.rehearse)
    if not args.rehearse and not torch.cuda.is_available():
        report.log("no GPU here: nothing to check (this command is for a lent GPU machine; "
                   "--rehearse runs the script on the CPU)")
        report.data["ok"] = False
        report.save()
        return 2
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1, 4099, 65536] if args.rehearse else SIZES)
    hidden = args.hidden or (64 if args.rehearse else 8192)
    t0 = time.monotonic()
    ok = report.section("what runs", what_runs)
    ok = report.section("identity", identity, sizes) and ok
    ok = report.section("GPU tests", gpu_tests) and ok
    for mode in ("every_step", "diloco"):
        ok = report.section(f"job {mode}", job, mode, hidden) and ok
    # Last: the profiler (CUPTI) is the least tried thing on the lent
    # machine's runtime, and nothing after it is lost if it misbehaves.
    ok = report.section("throughput", throughput, max(sizes)) and ok
    report.data["ok"] = ok
    report.data["seconds"] = round(time.monotonic() - t0, 1)
    report.log(("all checks passed" if ok else "SOME CHECKS FAILED (above)")
               + f" in {report.data['seconds']:.0f} s; sections: "
               + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'} {v['seconds']:.0f} s"
                           for k, v in report.data["sections"].items()))
    report.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
