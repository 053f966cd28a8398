"""GenMD4 on text8: MD4's text8 setting (configs/md4/text8.py), schedule learned per token.

  md4 train --config=configs/genmd4/text8.py
  md4 eval  --config=configs/genmd4/text8.py --split=test

Paper: the test-set bits/char of GenMD4 are in the paper's text8 table (Section 7), below MD4's; the
number is not re-verified here, so it is not quoted.
Presets: "tiny" (configs/presets.py).

What differs from MD4 (the paper's state-dependent schedules section and the released code): one
exponent w_v per vocabulary entry, alpha_v(t) = 1 - t^{w_v}, learned jointly with the network from
w_v = 1 (MD4's linear schedule): model.state_dependent = True, model.power_init = 1.0. As the
paper's code does, the network's gradient averages both masked samples drawn for the REINFORCE
leave-one-out estimate of w's gradient (model.network_masks = 2). Optimiser and regularisation
(dropout 0.05, weight decay 0.03; w is not decayed) are MD4's, which the released GenMD4 text8 sweep
matches.
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
