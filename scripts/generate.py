"""python scripts/generate.py ARGS is `bitnet generate ARGS` (see `bitnet generate --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["generate", *sys.argv[1:]]))
