"""strait's version and the oldest torch it supports: read by setuptools
(pyproject.toml), CMake (cmake/StraitTorch.cmake), ./strait and `import
strait`, so the numbers live here once. Keep the two assignments simple
(CMake and setuptools parse them, they do not import this file), and import
nothing here (./strait runs it before any package is installed)."""

__version__ = "0.2.0"

# The package index's Linux wheels use the C++11 std::string ABI from torch
# 2.7 on; strait links Debian's protobuf, yaml-cpp and ZeroMQ, which use it
# too, so an older wheel cannot load strait's library. README.md, "Supported
# versions".
TORCH_MIN = "2.7"


def too_old(torch_version):
    """True when a torch version string ("2.11.0+cu130") is older than TORCH_MIN."""
    def key(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])

    return key(torch_version) < key(TORCH_MIN)
