"""MD4 on downsampled ImageNet 64x64 pixels: a UNet around a transformer ("uvit").

  md4 train --config=configs/md4/imagenet64.py
  md4 eval  --config=configs/md4/imagenet64.py

Paper: <= 3.40 bits/dim on the ImageNet 64x64 validation set (abstract of the NeurIPS version,
arXiv 2406.04329v4; v1 reported 3.42). Unconditional, linear schedule, continuous-time bound.
Presets: "tiny" (configs/presets.py).

Sources: Section 7 and the appendix on experimental details of Shi et al. (2024), with the released
code's values where the paper is terse: residual blocks of width 256 at full resolution around a
transformer of width 768 with 12 heads, dropout 0.1. Depth: 24 residual blocks and 12 transformer
layers, which the released code notes as the paper's best-likelihood model (its own default, 8 and
20, is cheaper). AdamW at 2e-4 with a 100-step warm up and cosine decay, b2 0.99, weight decay 0.01,
EMA 0.9999; batch 512 for 2M steps. Everything but the data, the network and the batch is CIFAR-10's
(configs/md4/cifar10.py), which this file builds on.
"""

from configs import presets
from configs.md4 import cifar10


def get_config(arg=None):
  config = cifar10.get_config()
  config.data.dataset = "imagenet64"
  config.model.network = "uvit"
  config.model.net = dict(
      features=256,
      num_res_blocks=24,
      norm_groups=32,
      # The paper does not say how the transformer tokenises the 64x64 map; 2x2 patches (1024
      # tokens) is this network's default.
      patch_size=2,
      num_layers=12,
      num_heads=12,
      d_model=768,
      dropout_rate=0.1,
      num_classes=0,  # Unconditional: the paper's bits/dim.
  )
  config.train.batch_size = 512
  # The paper reports on the 50,000 held-out images (image sets serve them as "valid" and "test").
  return presets.apply(config, arg)
