"""fewclip command line (the same as the installed `fewclip` command); see fewclip/cli.py.

python run_shell.py                # the demo sweep (tiny CLIP, generated data)
python run_shell.py --help         # every flag, with examples
"""

import sys

from fewclip.cli import console

if __name__ == "__main__":
    sys.exit(console())
