"""The demo: a small MD4 transformer on the embedded Shakespeare corpus (text8 format), on a CPU.

  md4 train                  # this config is the default; or: md4 train --config=configs/demo.py

On 2 CPU cores it takes about 6 minutes and reaches about 2.9 bits/char on the whole validation
split, well below the corpus's unigram entropy (4.08 bits/char). Samples go to runs/demo/samples/.
The network is the paper's transformer (the released code's) at demo size.
Presets: "tiny" (configs/presets.py; configs/tiny.py is that preset).
"""

from configs import presets
from md4.config import base_config


def get_config(arg=None):
  config = base_config()
  config.data.dataset = "shakespeare"
  config.data.seq_length = 64
  config.model.vocab_size = 27
  config.model.network = "transformer"
  # The paper's network (the transformer's defaults) at demo size: 4 heads of 32, a 32-wide
  # conditioning vector as the paper's is one head wide.
  config.model.net = dict(num_layers=3, num_heads=4, d_model=128, cond_dim=32, mlp_ratio=2.0)
  config.model.schedule = "linear"
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.ema_decay = 0.99
  config.train.batch_size = 64
  config.train.num_steps = 1500
  config.train.log_every = 100
  config.train.eval_every = 500
  config.train.eval_batches = 4
  config.train.sample_every = 1500
  config.train.checkpoint_every = 500
  config.eval.batch_size = 128
  config.eval.max_examples = 0
  config.sample.num_samples = 4
  config.sample.num_steps = 128
  return presets.apply(config, arg)
