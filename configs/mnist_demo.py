"""The pixel demo: MD4 with a small class-conditional UNet on 4,500 embedded MNIST digits, shrunk to
14x14 and binarised.

  md4 train --config=configs/mnist_demo.py

Every pixel is a token over 2 levels (data.levels=2: ink where the 28x28 digit averaged over 2x2
blocks is >= 128). On 2 CPU cores it runs in a few minutes, reports bits per dimension on the 500
held-out digits next to the entropy of the pixel-value histogram, and writes a PNG grid of 100
samples (a row of the digits 0..9 ten times, the model asked for each in turn) to
runs/mnist_demo/samples/, with the share of them a digit classifier trained on the embedded labels
recognises with confidence >= 0.9, beside the same share for the held-out real digits (md4/digits.py).
Presets: "tiny" (configs/presets.py).

Why this shape: at 28x28 with 256 levels (this demo before) the same minutes of training gave
strokes, not digits; 14x14 binary digits are 4 times fewer tokens of 2 values, which the network
learns in the time, and nucleus sampling (top_p=0.9) drops the stray pixels of the tail.
"""

from configs import presets
from md4.config import base_config


def get_config(arg=None):
  config = base_config()
  config.data.dataset = "mnist"
  config.data.image_size = 14
  config.data.levels = 2
  config.model.vocab_size = 2
  config.model.network = "unet"
  config.model.net = dict(features=32, num_res_blocks=1, norm_groups=8, dropout_rate=0.0,
                          num_classes=10)
  config.model.schedule = "linear"
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.ema_decay = 0.99
  config.train.batch_size = 32
  config.train.num_steps = 3000
  config.train.log_every = 100
  config.train.eval_every = 0
  config.train.sample_every = 3000
  config.train.checkpoint_every = 1000
  config.eval.batch_size = 100
  config.sample.num_samples = 100
  config.sample.num_steps = 100
  config.sample.top_p = 0.9
  return presets.apply(config, arg)
