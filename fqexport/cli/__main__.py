"""``python -m fqexport.cli``."""

import sys

from fqexport.cli.main import main

sys.exit(main())
