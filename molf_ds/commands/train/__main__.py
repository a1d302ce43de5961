"""`python -m molf_ds.commands.train CONFIG.yaml [key=value ...]`: `molf-ds train`, as a module for launchers."""
import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
