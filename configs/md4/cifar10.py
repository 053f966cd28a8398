"""MD4 on CIFAR-10 pixels (32x32x3, 256 values per channel): the released code's UNet.

  md4 train --config=configs/md4/cifar10.py
  md4 eval  --config=configs/md4/cifar10.py --split=test

Paper: <= 2.75 bits/dim on the CIFAR-10 test set (abstract of arXiv 2406.04329v4, the NeurIPS
version; v1 reported 2.78). Unconditional, linear schedule, continuous-time bound.
Presets: "tiny" (configs/presets.py); "cfg", not the paper's: class-conditional with a null class and
10% label dropout, for classifier-free guidance (sample with --config.sample.guidance_scale=w).

Network: the released code's, layer for layer (28,427,520 parameters; `md4 info` prints the count):
VDM's single-resolution UNet. Each channel value embedded to 128 and the three embeddings
concatenated per pixel; 32 residual blocks of width 128 on the way down, two in the middle with a
one-head self-attention block between them, 33 on the way up; a 128-wide time embedding added
(through a zero-initialised projection) inside every block; dropout 0.1; a zero-initialised 3x3
conv to 3 x 256 logits per pixel.

Training: the released config: AdamW at 2e-4 after a 100-step warm up, cosine decay, b2 0.99,
weight decay 0.01, no clipping, EMA 0.9999; batch 256 for 2M steps; seed 0. The released code's
"best sample quality" alternative (cosine schedule, uniform sampling grid) is not the likelihood
setting and is not the default here.

Differs from the released code, on purpose: weight decay acts on parameters of two or more
dimensions only (kernels and embeddings, not biases or norm scales); the EMA warms up as
min(0.9999, (1 + n) / (10 + n)); evaluation covers the 10,000 test images once, the last batch
padded, where the released evaluation drops the remainder of a batch.
"""

from configs import presets
from md4.config import base_config


def classifier_free(config):
  """Conditions on CIFAR-10's 10 labels, with the null class ("no class") that 10% of the training
  examples see instead of their label, so one model is both p(x | c) and p(x)."""
  config.model.net = dict(config.model.net, num_classes=10, null_class=True)
  config.train.label_drop = 0.1


PRESETS = {"cfg": classifier_free}


def get_config(arg=None):
  config = base_config()

  config.data.dataset = "cifar10"

  config.model.vocab_size = 256
  config.model.network = "unet"
  # The paper's network: the UNet's defaults (md4/networks/unet.py) with these sizes.
  config.model.net = dict(features=128, num_res_blocks=32, attention=True, dropout_rate=0.1,
                          num_classes=0)  # Unconditional: the paper's bits/dim.
  config.model.schedule = "linear"

  config.optimizer.lr = 2e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.01
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.ema_decay = 0.9999

  config.train.seed = 0
  config.train.batch_size = 256
  config.train.num_steps = 2_000_000
  config.train.log_every = 500
  config.train.eval_every = 10_000
  config.train.sample_every = 50_000  # Our choice.
  config.train.checkpoint_every = 5000

  # The continuous-time bound over the 10,000 test images (CIFAR-10 has no validation split:
  # "valid" and "test" both read the test images).
  config.eval.split = "test"
  config.eval.batch_size = 256
  config.eval.timesteps = 0
  config.eval.num_time_samples = 1

  # 256 ancestral steps on a cosine time grid, as in the released code.
  config.sample.num_steps = 256
  config.sample.method = "ancestral"
  config.sample.time_grid = "cosine"
  return presets.apply(config, arg, PRESETS)
