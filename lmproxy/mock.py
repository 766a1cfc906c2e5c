"""``python -m lmproxy.mock``: the simulator's old name, kept working (``lmproxy/sim/``)."""

import sys

from lmproxy.sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
