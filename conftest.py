"""pytest: the repository root on sys.path, so tests import config files as `configs.*`."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
