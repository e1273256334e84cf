"""`python -m tracerl ...` (and `deepspeed --module tracerl ...`) run the CLI."""

import sys

from tracerl.cli import main

sys.exit(main())
