"""GenMD4-S on OpenWebText: MD4-S (configs/md4/openwebtext.py), schedule learned per token.

  md4 train --config=configs/genmd4/openwebtext.py
  md4 eval  --config=configs/genmd4/openwebtext.py

Paper: GenMD4-S's validation perplexity is in the paper's OpenWebText perplexity table (Section 7),
below MD4-S's; the number is not re-verified here, so it is not quoted. The paper and the released
code have GenMD4 at the small size only, so there is no "medium" preset here.
Presets: "tiny" (configs/presets.py).

What differs from MD4-S (the paper's state-dependent schedules section and the released code): one
exponent w_v per GPT-2 token, alpha_v(t) = 1 - t^{w_v}, learned jointly with the network from
w_v = 1 (the linear schedule), with model.state_dependent = True and model.power_init = 1.0. As the
paper's code does, the network's gradient averages both masked samples drawn for the REINFORCE
leave-one-out estimate of w's gradient (model.network_masks = 2). Everything else (dropout 0.02,
weight decay 0.03, batch 512 for 1M steps, lr 3e-4) is MD4-S's, which the released GenMD4 sweep
matches.
"""

from configs import presets
from configs.md4 import openwebtext


def get_config(arg=None):
  config = openwebtext.get_config()
  config.model.state_dependent = True
  config.model.power_init = 1.0
  config.model.network_masks = 2
  # model.schedule is unused once model.state_dependent is set; w_v = 1 starts as "linear".
  return presets.apply(config, arg)
