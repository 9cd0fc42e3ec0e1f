import sys

from detrkit.cli.main import main

sys.exit(main())
