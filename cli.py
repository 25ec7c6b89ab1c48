"""Run stacker from a checkout without installing it: `python cli.py <stage> ...`.

The parser lives in `stacker_cli`, the module the installed `stacker` command runs. This file is not
part of the wheel: a top-level module named `cli` would collide with any other distribution's `cli`.
"""
import sys

from stacker_cli import main

if __name__ == "__main__":
    sys.exit(main())
