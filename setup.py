"""Builds the C++ part for `pip install --no-build-isolation .` (metadata:
pyproject.toml). CMake compiles the extension against the torch of the
interpreter running pip; libstrait_torch.so goes inside the package, the C++
programs (strait_keys, strait_audit) into strait/bin/ for the `strait`
command. STRAIT_PIP_BUILD_DIR names the CMake build folder (default
build/pip); CMAKE_ARGS (the variable scikit-build and conda use) adds CMake
options after strait's, e.g. CMAKE_ARGS="-G Ninja -DCMAKE_BUILD_TYPE=Debug"."""

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildWithCMake(build_py):
    def run(self):
        super().run()
        build = os.environ.get("STRAIT_PIP_BUILD_DIR", os.path.join(ROOT, "build", "pip"))
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DSTRAIT_PYTHON={sys.executable}",
                        "-DSTRAIT_BUILD_TESTS=OFF", "-DSTRAIT_BUILD_BENCH=OFF", "-DSTRAIT_BUILD_TORCH=ON",
                        # Installed, the library finds torch's libraries in the torch package next to it.
                        "-DSTRAIT_TORCH_RPATH=$ORIGIN/../torch/lib",
                        *shlex.split(os.environ.get("CMAKE_ARGS", ""))], check=True)
        subprocess.run(["cmake", "--build", build, "--target", "strait_torch", "strait_keys", "strait_audit",
                        "-j", jobs], check=True)
        target = os.path.join(self.build_lib, "strait")
        os.makedirs(os.path.join(target, "bin"), exist_ok=True)
        shutil.copy2(os.path.join(build, "torch_ext", "libstrait_torch.so"), target)
        for prog in ("strait_keys", "strait_audit"):
            shutil.copy2(os.path.join(build, "transport", prog), os.path.join(target, "bin"))


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True  # the package carries compiled code: a platform wheel


setup(cmdclass={"build_py": BuildWithCMake}, distclass=BinaryDistribution)
