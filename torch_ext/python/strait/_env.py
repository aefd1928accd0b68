"""`./strait env` and `strait env`: one JSON object that says what strait runs
on: the Python interpreter, its torch (and whether it is a CUDA build), the
CUDA toolkit found (or none), strait's version and the extension library
with how it was built.

Run as a file by ./strait (`python _env.py --library PATH`): it must work
when the extension is not built yet, so it does not import the strait
package, whose import loads the library.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _meta():
    meta = {}
    with open(os.path.join(HERE, "_meta.py")) as f:
        exec(f.read(), meta)
    return meta


def cuda_toolkit():
    """{"nvcc": path, "version": "13.0"} for the toolkit CMake would find
    (nvcc on PATH, else $CUDA_HOME or /usr/local/cuda), or None."""
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for nvcc in candidates:
        if nvcc and os.access(nvcc, os.X_OK):
            try:
                text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            m = re.search(r"release (\d+\.\d+)", text)
            return {"nvcc": os.path.realpath(nvcc), "version": m.group(1) if m else None}
    return None


def report(library=None):
    """The environment as a dict. library: the extension to describe (loaded
    if it exists and torch imports); None for the one next to this package."""
    meta = _meta()
    out = {"python": sys.executable, "python_version": platform.python_version(), "strait": meta["__version__"],
           "torch_min": meta["TORCH_MIN"], "torch": None, "torch_cuda": None, "gpus": 0,
           "cuda_toolkit": cuda_toolkit(), "extension": None}
    try:
        import torch
    except ImportError as e:
        out["problem"] = f"cannot import torch: {e}"
        return out
    out["torch"] = torch.__version__
    out["torch_path"] = os.path.dirname(torch.__file__)
    out["torch_cuda"] = torch.version.cuda  # None for a CPU build
    out["gpus"] = torch.cuda.device_count() if torch.version.cuda else 0
    library = library or os.path.join(HERE, "libstrait_torch.so")
    if not os.path.exists(library):
        out["problem"] = f"the extension {library} is not built (./strait build)"
        return out
    ext = {"path": os.path.realpath(library)}
    try:
        torch.ops.load_library(library)
        ext.update(line.split("=", 1) for line in torch.classes.strait.Library.build_info().splitlines())
        ext["cuda"] = ext.get("cuda") == "1"
    except (OSError, RuntimeError) as e:
        out["problem"] = f"the extension {library} does not load: {e}"
    out["extension"] = ext
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="strait env", description=__doc__.splitlines()[0])
    ap.add_argument("--library", help="the extension library to describe (default: the installed one)")
    args = ap.parse_args(argv)
    print(json.dumps(report(args.library), indent=1))


if __name__ == "__main__":
    main()
