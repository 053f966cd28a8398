"""MD4 on ImageNet 32x32 (van den Oord et al. 2016's downsampled ImageNet): the released U-ViT.

  md4 train --config=configs/imagenet32.py
  md4 eval  --config=configs/imagenet32.py --split=test

Not a paper setting: the paper reports CIFAR-10 and ImageNet 64x64, and this file has not been
trained. Unconditional, linear schedule, continuous-time bound, reported in bits/dim on the
validation images. Presets: "tiny" (configs/presets.py).

Data: tfds `downsampled_imagenet/32x32`, the 32x32 configuration of the benchmark the paper uses at
64x64 (the released code reads either the same way), built by `md4 prepare imagenet32` from
train_32x32.tar and valid_32x32.tar; its validation images are the test set.

Network and training: configs/md4/imagenet64.py's (the released ImageNet 64x64 U-ViT and its
training settings), built for 32x32 images: the DiT sees 16x16 patches of 2x2 pixels (256 tokens,
a quarter of 64x64's), so its position table has 256 rows; `md4 info` prints the parameter count.
"""

from configs import presets
from configs.md4 import imagenet64


def get_config(arg=None):
  config = imagenet64.get_config()
  config.data.dataset = "imagenet32"
  return presets.apply(config, arg)
