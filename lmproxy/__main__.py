"""``python -m lmproxy``: the same as the ``lmproxy`` command."""

import sys

from lmproxy.cli import main

sys.exit(main())
