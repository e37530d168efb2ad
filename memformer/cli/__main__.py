"""`python -m memformer.cli ...` runs the `memformer` command."""
import sys

from memformer.cli.main import main

sys.exit(main())
