"""The demo's judge: a causal transformer on the Shakespeare training split (text8 characters).

  md4 train --config=configs/judge_demo.py
  md4 sample --workdir=runs/demo --judge=runs/judge_demo --sweep_steps=16,32,64,128

An autoregressive model with an exact likelihood, trained by this project's trainer, that scores the
demo model's samples where GPT-2 does not apply (the demo is over characters): generative perplexity
per character. It is the demo's network made causal and unconditioned, trained as long. On 2 CPU
cores it takes about 6 minutes and reached 2.31 bits/char on the validation split when measured;
its own bits/char is printed at the end of training and beside every score it gives, so the judge's
quality is known.
Presets: "tiny" (configs/presets.py).
"""

from configs import demo, presets


def get_config(arg=None):
  config = demo.get_config()
  config.model.objective = "autoregressive"
  config.model.net = dict(config.model.net, causal=True, time_conditioning=False)
  config.train.sample_every = 0  # The samplers are diffusion samplers.
  return presets.apply(config, arg)
