import sys

from segearth_jax.cli import main

sys.exit(main())
