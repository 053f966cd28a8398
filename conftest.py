"""pytest: the repository root on sys.path, so tests import config files as `configs.*`; and JAX on
the CPU, quietly, in the test process and every process it starts.

The test extra installs libtpu (tests compile for TPU slices, md4/aot.py). A libtpu that finds no
TPU would print its failed initialisation, and it holds a lock file that a second process trips on;
md4.aot.prepare_environment sets what prevents both, in os.environ (before jax is imported), so
subprocesses inherit it.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from md4 import aot  # pylint: disable=g-import-not-at-top,wrong-import-position

aot.prepare_environment()
