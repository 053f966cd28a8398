"""MD4 on CIFAR-10 pixels (32x32x3, 256 values per channel): the paper's UNet setting.

  md4 train --config=configs/md4/cifar10.py
  md4 eval  --config=configs/md4/cifar10.py

Paper: <= 2.75 bits/dim on the CIFAR-10 test set (abstract of the NeurIPS version, arXiv
2406.04329v4; v1 reported 2.78). Unconditional, linear schedule, continuous-time bound.
Presets: "tiny" (configs/presets.py).

Sources: Section 7 and the appendix on experimental details of Shi et al. (2024), with the released
code's values where the paper is terse: VDM's single-resolution UNet, 32 residual blocks of width
128 on the way down, no attention, dropout 0.1; AdamW at 2e-4 with a 100-step warm up and cosine
decay, b2 0.99, weight decay 0.01, EMA 0.9999; batch 256 for 2M steps. The released code's
"best sample quality" alternative (cosine schedule, uniform sampling grid) is not the likelihood
setting and is not the default here.
"""

from configs import presets
from md4.config import base_config


def get_config(arg=None):
  config = base_config()

  config.data.dataset = "cifar10"

  config.model.vocab_size = 256
  config.model.network = "unet"
  config.model.net = dict(
      features=128,
      num_res_blocks=32,
      attention=False,
      norm_groups=32,
      dropout_rate=0.1,
      num_classes=0,  # Unconditional: the paper's bits/dim.
  )
  config.model.schedule = "linear"

  config.optimizer.lr = 2e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.01
  config.optimizer.grad_clip_norm = 0.0  # The released code does not clip; the paper names none.
  config.optimizer.ema_decay = 0.9999

  config.train.seed = 0
  config.train.batch_size = 256
  config.train.num_steps = 2_000_000
  config.train.log_every = 500
  config.train.eval_every = 10_000
  config.train.sample_every = 50_000  # Our choice.
  config.train.checkpoint_every = 5000

  # The continuous-time bound over the 10,000 test images (image sets serve them as "valid" and
  # "test" alike).
  config.eval.batch_size = 256
  config.eval.timesteps = 0
  config.eval.num_time_samples = 1

  # 256 ancestral steps on a cosine time grid, as in the released code.
  config.sample.num_steps = 256
  config.sample.method = "ancestral"
  config.sample.time_grid = "cosine"
  return presets.apply(config, arg)
