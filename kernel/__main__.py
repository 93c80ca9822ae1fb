"""``python -m llmos.kernel``: run the kernel in the foreground."""

import sys

from llmos.kernel.main import main

sys.exit(main())
