"""strait's version and the oldest torch it supports: read by setuptools
(pyproject.toml), CMake (cmake/StraitTorch.cmake) and ./strait, so the
numbers live here once. Keep the two assignments simple (they are parsed,
not imported)."""

__version__ = "0.2.0"

# The package index's Linux wheels use the C++11 std::string ABI from torch
# 2.7 on; strait links Debian's protobuf, yaml-cpp and ZeroMQ, which use it
# too, so an older wheel cannot load strait's library. README.md, "Supported
# versions".
TORCH_MIN = "2.7"
