"""MD4-S on OpenWebText (GPT-2 tokens, 1024 per example); preset "medium" is MD4-M.

  md4 train --config=configs/md4/openwebtext.py           # MD4-S
  md4 train --config=configs/md4/openwebtext.py:medium    # MD4-M
  md4 eval  --config=configs/md4/openwebtext.py

Paper (arXiv 2406.04329v4): OpenWebText validation perplexity <= 22.13 for MD4-S and <= 16.64
for MD4-M (Table 5; GenMD4-S, configs/genmd4/openwebtext.py, <= 21.80), on the paper's split (2% of
the training set held out). Zero-shot perplexities (Table 1), LAMBADA / WikiText2 / PTB /
WikiText103 / 1BW: MD4-S 48.43 / 34.94 / 102.26 / 35.90 / 68.10; MD4-M 44.12 / 25.84 / 66.07 /
25.84 / 51.45.
Presets: "medium" (MD4-M), "tiny" (configs/presets.py); "medium,tiny" also works.

Network: the released code's, layer for layer (`md4 info` prints the counts): MD4-S 165,857,344
parameters, width 768 = 12 heads of 64, 12 layers; MD4-M 416,240,960, width 1024 = 16 heads of 64,
24 layers. Tokens embedded straight to the width, a 64-wide time embedding feeding
sigmoid-activated adaLN-zero over parameter-free LayerNorms, a sigmoid-gated MLP (2048 and 2752
wide) with depth-scaled initialisation, interleaved RoPE, a zero-initialised bias-free output layer.
Dropout as the released code applies it: element-wise on the embeddings and attention
probabilities, channel-wise on the residual branches.

Training: the released config with its sweep's values. MD4-S: linear schedule, dropout 0.02, weight
decay 0.03. MD4-M (its commented-out sweep entry): cosine schedule, no dropout, weight decay 0.03,
samples on a uniform time grid. Both: 1024 tokens per example, batch 512 for 1M steps, AdamW at
3e-4 (b2 0.999) after a 2000-step linear warm up, cosine decay, no clipping, EMA 0.9999, continuous
time, float32 (the released code has no other precision; train.compute_dtype=bfloat16 is ours, for
speed).

Data: `md4 prepare openwebtext` holds out whole documents, 0.5% by default (--heldout_fraction); the
released preparation script holds out 2% of the packed 1024-token blocks at random, so its
validation blocks may share documents with training blocks. Use --heldout_fraction=0.02 for a split
of the released size.

Differs from the released code, on purpose: weight decay acts on parameters of two or more
dimensions only (kernels and embeddings, not biases); the EMA warms up as
min(0.9999, (1 + n) / (10 + n)); evaluation scores every held-out block once, the last batch
padded, where the released evaluation drops the remainder.

Batch 512 x 1024 tokens does not fit one accelerator: keep train.batch_size (the optimisation is the
paper's) and raise train.grad_accum_steps, e.g. --config.train.grad_accum_steps=8. Accumulation
gives the gradient of the full batch exactly.
"""

from configs import presets
from md4.config import base_config


def medium(config):
  """MD4-M: 24 layers of width 1024 (16 heads of 64); the released code's medium sweep entry."""
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
  # The paper's network: the transformer's defaults (md4/networks/transformer.py) with these sizes.
  config.model.net = dict(num_layers=12, num_heads=12, d_model=768, cond_dim=64, dropout_rate=0.02)
  config.model.schedule = "linear"

  config.optimizer.lr = 3e-4
  config.optimizer.warmup_steps = 2000
  config.optimizer.decay = "cosine"
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.03
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.ema_decay = 0.9999

  config.train.seed = 42
  config.train.batch_size = 512
  config.train.num_steps = 1_000_000
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
