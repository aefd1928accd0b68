"""strait's command-line programs written in C++ (strait_keys, strait_audit):
where they are, for the `strait` command and the demo."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# The programs' folder inside the build tree, by program.
_IN_BUILD = {"strait_keys": "transport", "strait_audit": "transport"}


def source_root():
    """The checkout this package lives in, or None when it is installed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
    return root if os.path.exists(os.path.join(root, "torch_ext", "csrc", "ops.cc")) else None


def build_dir():
    """The CMake build of a checkout: $STRAIT_BUILD_DIR, else the checkout's
    build/; None for an installed strait without STRAIT_BUILD_DIR."""
    root = source_root()
    return os.environ.get("STRAIT_BUILD_DIR") or (os.path.join(root, "build") if root else None)


def program(name):
    """The path of a C++ program of strait's: installed next to the package
    (strait/bin/), else in $STRAIT_BUILD_DIR or the checkout's build/."""
    if name not in _IN_BUILD:
        raise ValueError(f"strait has no program '{name}' (it has {', '.join(sorted(_IN_BUILD))})")
    candidates = [os.path.join(_HERE, "bin", name)]
    build = build_dir()
    if build:
        candidates.append(os.path.join(build, _IN_BUILD[name], name))
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"strait: the program {name} was not found (looked in {', '.join(candidates)}); "
                            f"build it with ./strait build")
