"""GenMD4 on text8: MD4's text8 setting (configs/md4/text8.py), schedule learned per token.

  md4 train --config=configs/genmd4/text8.py
  md4 eval  --config=configs/genmd4/text8.py --split=test

Paper: <= 1.34 bits/char on the text8 test set (Table 2 of arXiv 2406.04329v4; MD4 <= 1.37).
Presets: "tiny" (configs/presets.py).

Network: MD4's text8 network, the released code's layer for layer, plus one exponent per character:
88,734,299 parameters (88,734,272 + 27; `md4 info` prints the count).

What differs from MD4 (the paper's state-dependent schedules section and the released code): one
exponent w_v per vocabulary entry, alpha_v(t) = 1 - t^{w_v}, learned jointly with the network from
w_v = 1 (MD4's linear schedule): model.state_dependent = True, model.power_init = 1.0. As the
released code does, the network's gradient averages both masked samples drawn for the REINFORCE
leave-one-out estimate of w's gradient (model.network_masks = 2). Optimiser and regularisation are
MD4's; lr 3e-4 is also the released GenMD4 sweep's (dropout 0.05, weight decay 0.03).

Differs from the released code, on purpose (besides MD4's differences): the schedule is squeezed as
every schedule here, alpha_v(t) = (1 - 2 eps)(1 - t^{w_v}) + eps with eps = 1e-4, with the
reconstruction and prior terms of the bound; the released GenMD4 sets alpha_v(t) = 1 - (1 - eps)
t^{w_v} and draws t from [1e-3, 1]. w is not weight-decayed here; the released optimizer decays it.
"""

from configs import presets
from configs.md4 import text8


def get_config(arg=None):
  config = text8.get_config()
  config.model.state_dependent = True
  config.model.power_init = 1.0
  config.model.network_masks = 2
  # model.schedule is unused once model.state_dependent is set; w_v = 1 starts as "linear".
  return presets.apply(config, arg)
