"""`python -m molf_ds.commands COMMAND ...`: the `molf-ds` command."""
import sys

from .cli import main

sys.exit(main())
