import sys

from detrkit.cli.main import run

sys.exit(run())
