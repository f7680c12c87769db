"""`python -m tcexport.cli`: the same entry point as the `tcexport` script."""

from tcexport.cli import main

main()
