"""MD4-S on FineWeb-Edu: the OpenWebText setting (configs/md4/openwebtext.py) on another corpus.

  md4 train --config=configs/md4/fineweb_edu.py
  md4 eval  --config=configs/md4/fineweb_edu.py

Paper: none. The paper reports no FineWeb-Edu result; the released code ships this setting beside
OpenWebText, with the same model and sweep, so this config has no target number.
Presets: "medium" (MD4-M size), "tiny" (configs/presets.py).

Everything but the dataset is inherited: GPT-2 tokens, 1024 per example, the released MD4-S network
(165,857,344 parameters), dropout 0.02, weight decay 0.03, batch 512 for 1M steps, and the same
deliberate differences from the released code (see configs/md4/openwebtext.py).
"""

from configs import presets
from configs.md4 import openwebtext


def get_config(arg=None):
  config = openwebtext.get_config()
  config.data.dataset = "fineweb_edu"
  return presets.apply(config, arg, openwebtext.PRESETS)
