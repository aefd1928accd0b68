"""pip install --no-build-isolation .

Builds the C++ extension with CMake (against the torch this interpreter
imports) and installs the `strait` package with libstrait_torch.so inside it.
--no-build-isolation makes the build see the installed torch; Debian's
python3-torch, libtorch-dev and the packages ./strait installs are needed.
"""

import os
import shutil
import subprocess

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildWithCMake(build_py):
    def run(self):
        super().run()
        build = os.environ.get("STRAIT_PIP_BUILD_DIR", os.path.join(ROOT, "build", "pip"))
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                        "-DSTRAIT_BUILD_TESTS=OFF", "-DSTRAIT_BUILD_BENCH=OFF", "-DSTRAIT_BUILD_TORCH=ON"],
                       check=True)
        subprocess.run(["cmake", "--build", build, "--target", "strait_torch", "-j", jobs], check=True)
        target = os.path.join(self.build_lib, "strait")
        os.makedirs(target, exist_ok=True)
        shutil.copy2(os.path.join(build, "torch_ext", "libstrait_torch.so"), target)


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True  # the package carries a compiled library: a platform wheel


setup(
    name="strait",
    version="0.1.0",
    description="Cross-border training: compressed, encrypted exchange of model updates between sites",
    package_dir={"": "torch_ext/python"},
    packages=["strait"],
    python_requires=">=3.9",
    cmdclass={"build_py": BuildWithCMake},
    distclass=BinaryDistribution,
)
