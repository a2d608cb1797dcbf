"""`python -m service.cli`: the `neuroserve` command."""

import sys

from service.cli.main import main

sys.exit(main())
