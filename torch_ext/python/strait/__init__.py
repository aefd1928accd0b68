"""strait: train one model across borders.

`import strait` loads the C++ extension and exposes typed wrappers over
`torch.ops.strait.*` (operators with fake kernels: they trace under
torch.compile) and the torch custom classes under `torch.classes.strait`:

    payload = strait.encode(grad, "topk(0.01) -> int8")     # uint8 tensor
    strait.decode_accumulate(mean, payload, weight=0.5)      # mean += 0.5 * decoded
    c = strait.Compressor("sign", error_feedback=True)       # one per tensor
    payload = c.encode(grad)

Training across sites:

    session = strait.init("job.yaml", site="hangzhou")   # torchrun env inside the site
    ddp.register_comm_hook(session, strait.ddp_hook)      # every-step mode
    strait.fsdp_hook(model, session)                      # every-step mode, FSDP2-sharded model
    diloco = strait.DiLoCo(model, opt, session, sync_every=50)   # or DiLoCo

Pipelines and config keys are documented in docs/CONFIG.md.
"""

import os

import torch

from . import tools
from ._meta import TORCH_MIN, __version__, too_old

if too_old(torch.__version__):
    raise ImportError(f"strait {__version__} needs torch {TORCH_MIN} or newer; this is torch {torch.__version__} "
                      f"(README.md, 'Supported versions')")

__all__ = ["encode", "decode", "decode_accumulate", "payload_info", "Compressor", "library_path", "build_info",
           "__version__",
           "init", "Session", "StraitError", "PolicyViolation", "ddp_hook", "fsdp_hook", "DiLoCo",
           "Checkpoints"]


def _find_library():
    """The extension: $STRAIT_TORCH_LIB, next to this package (installed), or
    the in-tree build (build/torch_ext/)."""
    env = os.environ.get("STRAIT_TORCH_LIB")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "libstrait_torch.so")]
    build = tools.build_dir()
    if build:
        candidates.append(os.path.join(build, "torch_ext", "libstrait_torch.so"))
    for c in candidates:
        if os.path.exists(c):
            return c
    raise ImportError("strait: the C++ extension libstrait_torch.so was not found (looked in "
                      + ", ".join(candidates) + "); build it with ./strait build or set STRAIT_TORCH_LIB")


library_path = _find_library()
torch.ops.load_library(library_path)
_ops = torch.ops.strait
_lib = torch.classes.strait.Library
from . import _fake  # noqa: E402,F401 - registers the operators' fake kernels


def _seed(seed) -> int:
    """A seed of [0, 2^64-1] (CONFIG.md's range) as the int64 with the same
    64 bits: the operators take torch's `int`, which is signed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"strait: seed must be an integer in [0, 2^64-1], got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"strait: seed = {seed}: must be in [0, 2^64-1]")
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def encode(x: torch.Tensor, pipeline: str, seed: int = 0) -> torch.Tensor:
    """Compresses a float32 tensor (any device); returns the self-describing
    payload, a 1-D uint8 CPU tensor (bytes bound for the network). `seed`
    (0 to 2^64-1) drives stochastic rounding and random choices."""
    return _ops.encode(x, pipeline, _seed(seed))


def decode(payload: torch.Tensor, shape) -> torch.Tensor:
    """Decodes a payload into a new float32 tensor of `shape`, on the payload's device."""
    return _ops.decode(payload, list(shape))


def decode_accumulate(acc: torch.Tensor, payload: torch.Tensor, weight: float = 1.0) -> None:
    """acc += weight * decode(payload), in place; a malformed payload raises
    and leaves acc untouched (CPU)."""
    _ops.decode_accumulate(acc, payload, float(weight))


def payload_info(payload: torch.Tensor):
    """(number of values, structure, value codec, bits per value) from a payload's header."""
    return _lib.payload_info(payload)


def build_info() -> dict:
    """How the loaded extension was built: strait's version, the torch it was
    compiled against, whether its CUDA part is in (and for which GPU
    architectures), the CUDA runtime's version and the GPUs it sees."""
    info = dict(line.split("=", 1) for line in _lib.build_info().splitlines())
    for key in ("cuda", "cuda_runtime", "cuda_devices", "device_codecs"):
        if key in info:
            info[key] = int(info[key])
    info["cuda"] = bool(info["cuda"])
    info["library"] = library_path
    return info


class Compressor:
    """One tensor's compressor: its pipeline, codec state (stochastic rounding
    stream, lowrank warm start) and, with error feedback, its residual."""

    def __init__(self, pipeline: str, seed: int = 0, error_feedback: bool = True):
        self._c = torch.classes.strait.Compressor(pipeline, _seed(seed), error_feedback)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._c.encode(x)

    def residual(self) -> torch.Tensor:
        return self._c.residual()

    def set_residual(self, r: torch.Tensor) -> None:
        self._c.set_residual(r)

    def reset(self) -> None:
        self._c.reset()

    @property
    def pipeline(self) -> str:
        return self._c.pipeline()

    @property
    def error_feedback(self) -> bool:
        return self._c.error_feedback()


from .session import PolicyViolation, Session, StraitError, init  # noqa: E402
from .ddp import ddp_hook  # noqa: E402
from .fsdp import fsdp_hook  # noqa: E402
from .diloco import DiLoCo  # noqa: E402
from .recovery import Checkpoints  # noqa: E402
