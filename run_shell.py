"""fewclip command line (the same as the installed `fewclip` command); see fewclip/cli.py.

python run_shell.py                # the demo sweep (tiny CLIP, generated data)
python run_shell.py --help         # every flag, with examples
"""

import sys

from fewclip.cli import console, main

__all__ = ["main"]  # run_shell.main(argv): the command from Python, without the quick exit

if __name__ == "__main__":
    sys.exit(console())
