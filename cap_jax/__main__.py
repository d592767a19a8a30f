"""`python -m cap_jax` is the `cap-jax` command."""

import sys

from cap_jax.cli import main

sys.exit(main())
