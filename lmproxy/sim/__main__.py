import sys

from lmproxy.sim.cli import main

sys.exit(main())
