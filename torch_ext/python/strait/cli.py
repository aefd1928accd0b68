"""The `strait` command of an installed strait (pip install): the parts of
./strait that make sense outside a checkout.

    strait launch CONFIG [--site NAME] [--wan PROFILE] -- CMD...
    strait keys generate|rotate SITE [--dir DIR]
    strait audit verify LOG --key SITE.sign.pub [--head HEX]
    strait data manifest|verify ...
    strait demo [--out DIR] [--wan PROFILE]
    strait env

Building, testing and benchmarking stay with ./strait in a checkout.
"""

import os
import sys

COMMANDS = ("launch", "keys", "audit", "data", "demo", "env")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"strait: unknown command '{cmd}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if cmd in ("keys", "audit"):
        from . import tools

        prog = tools.program(f"strait_{cmd}")
        os.execv(prog, [prog] + rest)  # the C++ program's own exit status and messages
    if cmd == "env":
        from . import _env

        _env.main(rest)
        return 0
    if cmd == "launch":
        from . import launch

        return launch.main(rest)
    if cmd == "data":
        from . import data

        return data.main(rest)
    from .demo import run

    run.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
