"""GenMD4-S on OpenWebText: MD4-S (configs/md4/openwebtext.py), schedule learned per token.

  md4 train --config=configs/genmd4/openwebtext.py
  md4 eval  --config=configs/genmd4/openwebtext.py

Paper: OpenWebText validation perplexity <= 21.80 (Table 5 of arXiv 2406.04329v4; MD4-S
<= 22.13), on the paper's split (2% of the training set held out). The paper reports no zero-shot
numbers for GenMD4.
Presets: "medium" (a GenMD4 of MD4-M's size: the paper has none; 416,295,315 parameters),
"tiny" (configs/presets.py).

Network: MD4-S's, the released code's layer for layer, over the released GenMD4's vocabulary of
50259 entries (GPT-2's 50257 tokens + 2 that never occur in the data: model.extra_tokens = 2; they
are never sampled), plus one exponent per entry: 165,910,675 parameters (`md4 info` prints it).

What differs from MD4-S (the paper's state-dependent schedules section and the released code): one
exponent w_v per vocabulary entry, alpha_v(t) = 1 - t^{w_v}, learned jointly with the network from
w_v = 1 (the linear schedule), with model.state_dependent = True and model.power_init = 1.0. As the
released code does, the network's gradient averages both masked samples drawn for the REINFORCE
leave-one-out estimate of w's gradient (model.network_masks = 2). Everything else (dropout 0.02,
weight decay 0.03, batch 512 for 1M steps, lr 3e-4) is MD4-S's, which the released GenMD4 sweep
matches.

Differs from the released code, on purpose (besides MD4-S's differences): the schedule is squeezed
as every schedule here, alpha_v(t) = (1 - 2 eps)(1 - t^{w_v}) + eps with eps = 1e-4, with the
reconstruction and prior terms of the bound; the released GenMD4 sets alpha_v(t) = 1 - (1 - eps)
t^{w_v} and draws t from [1e-3, 1]. w is not weight-decayed here; the released optimizer decays it.
"""

from configs import presets
from configs.md4 import openwebtext


def get_config(arg=None):
  config = openwebtext.get_config()
  config.model.vocab_size = 50259
  config.model.extra_tokens = 2
  config.model.state_dependent = True
  config.model.power_init = 1.0
  config.model.network_masks = 2
  # model.schedule is unused once model.state_dependent is set; w_v = 1 starts as "linear".
  return presets.apply(config, arg, openwebtext.PRESETS)
