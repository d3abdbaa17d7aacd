"""``python -m asgd_jax.cli``: the ``asgd-jax`` command."""

import sys

from asgd_jax.cli import main

sys.exit(main())
