"""MD4 on ImageNet 64x64 (van den Oord et al. 2016's downsampled ImageNet): the released U-ViT.

  md4 train --config=configs/md4/imagenet64.py
  md4 eval  --config=configs/md4/imagenet64.py --split=test

Paper: <= 3.40 bits/dim on the ImageNet 64x64 validation set (abstract of arXiv 2406.04329v4, the
NeurIPS version; v1 reported 3.42). Unconditional, linear schedule, continuous-time bound.
Presets: "tiny" (configs/presets.py).

Data: tfds `downsampled_imagenet/64x64`, the density-estimation benchmark the paper and the released
code use, built by `md4 prepare imagenet64` from train_64x64.tar and valid_64x64.tar; its validation
images are the test set. (dataset "imagenet64_resized", tfds `imagenet_resized/64x64`, is
another resize made for classification; bits/dim on it are not comparable with the paper's.)

Network: the released code's, layer for layer (198,279,680 parameters; `md4 info` prints the
count): the network of the paper's best likelihood, which the released config notes as 24 residual
blocks and 12 transformer layers (its own default, 8 and 20, is cheaper). Channel values embedded
to 256 and concatenated per pixel; 24 residual blocks of width 256 whose GroupNorms take scale and
shift from the 256-wide time embedding; a DiT on 2x2 patches (1024 tokens) of width 768, 12 heads,
12 layers, with a learned position table started at 2D sin-cos features; 25 residual blocks on the
way up; dropout 0.1.

Training: CIFAR-10's (configs/md4/cifar10.py, which this file builds on, with the same deliberate
differences from the released code), with batch 512 as in the released config.
"""

from configs import presets
from configs.md4 import cifar10


def get_config(arg=None):
  config = cifar10.get_config()
  config.data.dataset = "imagenet64"
  config.model.network = "uvit"
  # The paper's network: the U-ViT's defaults (md4/networks/uvit.py) with these sizes.
  config.model.net = dict(features=256, num_res_blocks=24, patch_size=2, num_layers=12,
                          num_heads=12, d_model=768, dropout_rate=0.1, num_classes=0)
  config.train.batch_size = 512
  return presets.apply(config, arg)
