"""``python -m l4proxy_init``: the same as the ``l4proxy-init`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
