"""MD4-S on OpenWebText (GPT-2 tokens, 1024 per example); preset "medium" is MD4-M.

  md4 train --config=configs/md4/openwebtext.py           # MD4-S
  md4 train --config=configs/md4/openwebtext.py:medium    # MD4-M
  md4 eval  --config=configs/md4/openwebtext.py

Paper: validation perplexity of MD4-S and MD4-M (and GenMD4-S, configs/genmd4/openwebtext.py) in the
paper's OpenWebText perplexity table, zero-shot perplexities in its zero-shot table (Section 7); the
numbers are not re-verified here, so they are not quoted. Validation is 2% of the original training
set, held out.
Presets: "medium" (MD4-M), "tiny" (configs/presets.py); "medium,tiny" also works.

Sources: Section 7 and the appendix on experimental details of Shi et al. (2024), arXiv 2406.04329,
with the regularisation that the released code keeps in its sweep functions:
  MD4-S: GPT-2 small sized transformer (12 layers, width 768, 12 heads), linear schedule,
         dropout 0.02, weight decay 0.03.
  MD4-M: GPT-2 medium sized transformer (24 layers, width 1024, 16 heads), cosine schedule,
         no dropout, weight decay 0.03, samples on a uniform time grid.
  Both: 1024 tokens per example, batch 512 for 1M steps, AdamW at 3e-4 with a 2000-step linear
  warm up and cosine decay, EMA 0.9999, continuous time.

Batch 512 x 1024 tokens does not fit one accelerator: keep train.batch_size (the optimisation is the
paper's) and raise train.grad_accum_steps, e.g. --config.train.grad_accum_steps=8. Accumulation
gives the gradient of the full batch exactly.
"""

from configs import presets
from md4.config import base_config


def medium(config):
  """MD4-M: GPT-2 medium size; the released code's medium sweep entry."""
  config.model.net.num_layers = 24
  config.model.net.num_heads = 16
  config.model.net.d_model = 1024
  config.model.net.dropout_rate = 0.0
  config.model.schedule = "cosine"
  config.sample.time_grid = "uniform"


PRESETS = {"medium": medium}


def get_config(arg=None):
  config = base_config()

  config.data.dataset = "openwebtext"
  config.data.seq_length = 1024

  config.model.vocab_size = 50257  # GPT-2's tokenizer.
  config.model.network = "transformer"
  config.model.net = dict(
      num_layers=12, num_heads=12, d_model=768,
      # Gated MLP at 8/3 of the width: the parameters of GPT-2's 4x ungated MLP (the paper compares
      # at GPT-2 sizes; it does not give the ratio).
      mlp_ratio=8 / 3,
      dropout_rate=0.02,
  )
  config.model.schedule = "linear"

  config.optimizer.lr = 3e-4
  config.optimizer.warmup_steps = 2000
  config.optimizer.decay = "cosine"
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.03
  config.optimizer.grad_clip_norm = 0.0  # The released code does not clip; the paper names none.
  config.optimizer.ema_decay = 0.9999

  config.train.seed = 42
  config.train.batch_size = 512
  config.train.num_steps = 1_000_000
  config.train.compute_dtype = "bfloat16"  # As the released code trains on OpenWebText.
  config.train.log_every = 500
  config.train.eval_every = 10_000
  config.train.sample_every = 100_000  # Our choice: 1000-step samples of 1024 tokens are costly.
  config.train.checkpoint_every = 5000

  config.eval.batch_size = 64
  config.eval.timesteps = 0  # The continuous-time bound.
  config.eval.num_time_samples = 1

  config.sample.num_steps = 1000
  config.sample.method = "ancestral"
  config.sample.time_grid = "cosine"
  return presets.apply(config, arg, PRESETS)
