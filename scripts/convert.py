"""python scripts/convert.py ARGS is `bitnet convert ARGS` (see `bitnet convert --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
