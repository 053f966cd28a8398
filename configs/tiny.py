"""A tiny MD4 for tests: seconds per run on one CPU core. The demo with the shared "tiny" preset.

  md4 train --config=configs/tiny.py --workdir=/tmp/md4_tiny
  (the same as --config=configs/demo.py:tiny)

No target number: it checks that training, checkpoints, evaluation and sampling run.
"""

from configs import demo, presets


def get_config(arg=None):
  return presets.apply(demo.get_config("tiny"), arg)
