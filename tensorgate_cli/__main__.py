import sys

from tensorgate_cli import main

sys.exit(main())
