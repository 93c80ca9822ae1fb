"""``python -m llmos``: the llmos command."""

import sys

from llmos._main import cli

sys.exit(cli())
