"""``python -m parscale_edge ...`` is the ``parscale`` command."""
import sys

from parscale_edge.cli import main

sys.exit(main())
