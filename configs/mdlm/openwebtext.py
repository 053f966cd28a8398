"""MDLM on OpenWebText (Sahoo et al. 2024): MDLM's network, schedule and training settings.

  md4 train --config=configs/mdlm/openwebtext.py
  md4 convert --config=configs/mdlm/openwebtext.py --from_mdlm=DIR_OR_CKPT --workdir=runs/mdlm_owt
  md4 eval --config=configs/mdlm/openwebtext.py --workdir=runs/mdlm_owt

The released checkpoint (kuleshov-group/mdlm-owt: a Hugging Face directory, config.json and
model.safetensors, or the Lightning .ckpt of kuleshov-group/mdlm) converts into a checkpoint of this
project (md4/convert_mdlm.py), which `md4 eval` (the bound on the validation split, the zero-shot
table) and `md4 sample` (every sampler; --judge with any --judge_protocol) then read like any other.
MDLM's own figures are in its paper (validation perplexity, Table 2; zero-shot, Table 3); the
commands that put them beside MD4's under one protocol are in docs/evaluation.md.

Network: models/dit.py's DIT with SUBS (md4/networks/dit.py): 12 blocks of width 768 (12 heads of
64), a 128-wide conditioning vector, a 4x GELU MLP, dropout 0.1, no time conditioning (sigma = 0:
the network never sees t). Vocabulary: GPT-2's 50257 tokens, the mask id 50257 = MDLM's
mask_index (its network's 50258 rows).
Schedule: log-linear, alpha(t) = 1 - (1 - 1e-3) t (md4/schedules.py "loglinear", eps 1e-3 as
MDLM's LogLinearNoise), whose weight 1/t is MDLM's dsigma / expm1(sigma). The bound reported here
integrates t over [0, 1] with its prior term (1e-3 log 50257 nats per token); MDLM's validation
loss draws t from [1e-3, 1] and has no prior term.
Training: MDLM's configs/config.yaml: batch 512 x 1024 tokens for 1M steps, AdamW at 3e-4 (b2
0.999, no weight decay) after 2500 warm-up steps, constant, clipping at norm 1, EMA 0.9999,
antithetic times. Sampling: ancestral on a uniform grid; it calls the network only on steps that
unmask something, which saves what MDLM's ddpm_cache saves (reusing the output of such steps).
"""

from configs import presets
from md4.config import base_config


def get_config(arg=None):
  config = base_config()

  config.data.dataset = "openwebtext"
  config.data.seq_length = 1024

  config.model.vocab_size = 50257  # GPT-2's tokenizer; the mask is 50257.
  config.model.network = "dit"
  config.model.net = dict(num_layers=12, num_heads=12, d_model=768, cond_dim=128, mlp_ratio=4,
                          dropout_rate=0.1, time_conditioning=False)
  config.model.schedule = "loglinear"
  config.model.eps = 1e-3

  config.optimizer.lr = 3e-4
  config.optimizer.warmup_steps = 2500
  config.optimizer.decay = "constant"
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.ema_decay = 0.9999

  config.train.seed = 1
  config.train.batch_size = 512
  config.train.num_steps = 1_000_000
  config.train.log_every = 500
  config.train.eval_every = 10_000
  config.train.sample_every = 100_000
  config.train.checkpoint_every = 5000

  config.eval.batch_size = 64
  config.eval.timesteps = 0  # The continuous-time bound.
  config.eval.num_time_samples = 1

  config.sample.num_steps = 1000
  config.sample.method = "ancestral"
  config.sample.time_grid = "uniform"
  return presets.apply(config, arg)
