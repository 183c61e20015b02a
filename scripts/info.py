"""python scripts/info.py ARGS is `bitnet info ARGS` (see `bitnet info --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["info", *sys.argv[1:]]))
