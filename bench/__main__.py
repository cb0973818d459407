"""`python -m bench` (`make bench`): run every bench module in turn; each prints its own table."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main() -> int:
    status = 0
    for name in modules():
        print(f"== bench.{name}")
        status = max(status, importlib.import_module(f"bench.{name}").main())
    return status


if __name__ == "__main__":
    sys.exit(main())
