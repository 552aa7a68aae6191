"""`python -m adjoint`: the `adjoint` command."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
