# Finds the torch that strait builds against and defines the imported target
# strait::torch (headers, libraries, ABI flag, run path).
#
# The torch is the one STRAIT_PYTHON imports (./strait passes the project
# environment's interpreter; pip passes the interpreter running the build).
# Why not find_package(Torch)? TorchConfig.cmake of a CUDA build of torch -
# every Linux wheel on the package index - stops with "Your installed Caffe2
# version uses CUDA but I cannot find the CUDA libraries" on a machine without
# the CUDA toolkit, although none of strait's CPU code needs it; and it adds
# CUDA flags to every target. torch.utils.cpp_extension builds extensions the
# same way as here: include paths, libraries and the ABI flag from torch
# itself. A libtorch distribution without Python still works through
# -DTorch_DIR=... (find_package(Torch), the way libtorch documents).
#
# Sets: STRAIT_TORCH_VERSION, STRAIT_TORCH_CUDA (the CUDA version torch was
# built with, "" for a CPU build), STRAIT_TORCH_LIB_DIR.

# The oldest torch, from the one place that says it (torch_ext/python/strait/_meta.py).
file(STRINGS "${PROJECT_SOURCE_DIR}/torch_ext/python/strait/_meta.py" _min REGEX "^TORCH_MIN = ")
string(REGEX REPLACE "^TORCH_MIN = \"([0-9.]+)\".*" "\\1" STRAIT_TORCH_MIN_VERSION "${_min}")

if(DEFINED Torch_DIR AND NOT DEFINED STRAIT_PYTHON)
  find_package(Torch REQUIRED)
  add_library(strait::torch INTERFACE IMPORTED GLOBAL)
  target_link_libraries(strait::torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(strait::torch INTERFACE ${TORCH_INCLUDE_DIRS})
  separate_arguments(_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  target_compile_options(strait::torch INTERFACE ${_flags})
  set(STRAIT_TORCH_VERSION "${Torch_VERSION}")
  set(STRAIT_TORCH_CUDA "")
  get_filename_component(STRAIT_TORCH_LIB_DIR "${TORCH_LIBRARY}" DIRECTORY)
  return()
endif()

if(NOT DEFINED STRAIT_PYTHON)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  set(STRAIT_PYTHON "${Python3_EXECUTABLE}")
endif()
set(STRAIT_PYTHON "${STRAIT_PYTHON}" CACHE FILEPATH "The Python interpreter whose torch strait builds against")

execute_process(
  COMMAND "${STRAIT_PYTHON}" -c "
import os, torch
from torch.utils import cpp_extension as ce
print(torch.__version__.split('+')[0])
print(torch.version.cuda or '')
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(';'.join(ce.include_paths()))
"
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "strait: ${STRAIT_PYTHON} cannot import torch:\n${_err}\n"
                      "Run ./strait build (it makes the project environment), pass -DSTRAIT_PYTHON=<python with torch>, "
                      "or -DTorch_DIR=<libtorch>/share/cmake/Torch for a libtorch distribution.")
endif()
string(REPLACE "\n" ";" _lines "${_out}")
list(GET _lines 0 STRAIT_TORCH_VERSION)
list(GET _lines 1 STRAIT_TORCH_CUDA)
list(GET _lines 2 _abi)
list(GET _lines 3 STRAIT_TORCH_LIB_DIR)
list(SUBLIST _lines 4 -1 _includes)  # the include paths, joined with ';' on the last line

if(STRAIT_TORCH_VERSION VERSION_LESS STRAIT_TORCH_MIN_VERSION)
  message(FATAL_ERROR "strait: torch ${STRAIT_TORCH_VERSION} (from ${STRAIT_PYTHON}) is older than "
                      "${STRAIT_TORCH_MIN_VERSION}, the oldest strait supports (README.md says why)")
endif()
if(NOT _abi EQUAL 1)
  # strait links Debian's protobuf, yaml-cpp and ZeroMQ, built with the C++11
  # string ABI; a torch built with the old ABI cannot share std::string with them.
  message(FATAL_ERROR "strait: torch ${STRAIT_TORCH_VERSION} was built with the pre-C++11 std::string ABI "
                      "(_GLIBCXX_USE_CXX11_ABI=0); strait needs a torch built with the C++11 ABI (the package index's "
                      "wheels are, from torch 2.7 on)")
endif()

set(_libs)
foreach(_name torch torch_cpu c10)
  unset(_lib_${_name} CACHE)  # another interpreter may have been configured before
  find_library(_lib_${_name} NAMES ${_name} PATHS "${STRAIT_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
  list(APPEND _libs "${_lib_${_name}}")
endforeach()

add_library(strait::torch INTERFACE IMPORTED GLOBAL)
target_include_directories(strait::torch SYSTEM INTERFACE ${_includes})
target_link_libraries(strait::torch INTERFACE ${_libs})
target_compile_definitions(strait::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
# Programs (tests, examples) find torch's libraries without LD_LIBRARY_PATH:
# CMake puts the folder of every library linked by its full path into the
# build tree's run path. The pip build replaces that with STRAIT_TORCH_RPATH
# (torch_ext/CMakeLists.txt).
message(STATUS "strait: torch ${STRAIT_TORCH_VERSION} (CUDA: ${STRAIT_TORCH_CUDA}) from ${STRAIT_PYTHON}")
