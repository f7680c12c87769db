#!/usr/bin/env python
"""Write the README's method table from the method registry (tcexport.methods.table), or --check that it is current.

    python scripts/method_table.py            # rewrite the table in README.md
    python scripts/method_table.py --check    # exit 1 when README.md's table differs from the registry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tcexport.methods import table

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is out of date")
    args = parser.parse_args()
    text = README.read_text()
    current = table.replace_in(text)
    if args.check:
        if current != text:
            print(f"{README.name}: the methods table differs from the registry; run scripts/method_table.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(current)
    print(f"wrote the methods table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
