"""`python -m tracerl ...` (and `deepspeed --module tracerl ...`) run the CLI."""

from tracerl.cli import entry

entry()
