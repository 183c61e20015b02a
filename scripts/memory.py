"""python scripts/memory.py ARGS is `bitnet memory ARGS` (see `bitnet memory --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["memory", *sys.argv[1:]]))
