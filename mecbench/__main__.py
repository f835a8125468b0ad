"""`python -m mecbench` is the `mecbench` command."""

import sys

from mecbench.cli import main

sys.exit(main())
