"""`python -m tensorgate`: the `tensorgate` command."""

import sys

from tensorgate.command import main

sys.exit(main())
