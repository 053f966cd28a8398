"""The pixel demo: MD4 with a small UNet on 4,500 embedded MNIST digits (28x28, 256 grey levels).

  md4 train --config=configs/mnist_demo.py

Every pixel is a token over 256 values. On 2 CPU cores it runs in a few minutes, reports bits per
dimension on the 500 held-out digits next to the entropy of the pixel-value histogram, and writes a
PNG grid of samples to runs/mnist_demo/samples/.
Presets: "tiny" (configs/presets.py).
"""

from configs import presets
from md4.config import base_config


def get_config(arg=None):
  config = base_config()
  config.data.dataset = "mnist"
  config.model.vocab_size = 256
  config.model.network = "unet"
  config.model.net = dict(features=32, num_res_blocks=1, norm_groups=8, dropout_rate=0.0)
  config.model.schedule = "linear"
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.ema_decay = 0.99
  config.train.batch_size = 16
  config.train.num_steps = 600
  config.train.log_every = 50
  config.train.eval_every = 0
  config.train.sample_every = 600
  config.train.checkpoint_every = 300
  config.eval.batch_size = 100
  config.sample.num_samples = 16
  config.sample.num_steps = 100
  return presets.apply(config, arg)
