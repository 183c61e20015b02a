"""python scripts/compare.py ARGS is `bitnet compare ARGS` (see `bitnet compare --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["compare", *sys.argv[1:]]))
