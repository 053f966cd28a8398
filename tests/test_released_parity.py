"""Parity with the released code itself, given a checkout of google-deepmind/md4:

  MD4_RELEASED_REPO=/path/to/google-deepmind/md4 python -m pytest tests/test_released_parity.py

The released networks run in a subprocess (their package is also named `md4`) on random parameters
and write those parameters, the inputs and their logits; this project converts the parameters with
`md4 convert`'s code and must give the same logits to float32 round-off. Skipped without
MD4_RELEASED_REPO: CI has no copy of the released code (tests/test_convert.py checks the same
against a NumPy transcription of it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config as config_lib
from md4 import convert, model
from md4.data import pipeline

RELEASED = os.environ.get("MD4_RELEASED_REPO")
pytestmark = pytest.mark.skipif(not RELEASED, reason="set MD4_RELEASED_REPO to a checkout of "
                                "google-deepmind/md4")

# Runs inside the released package: its DiscreteClassifier, every parameter random (so its
# zero-initialised layers are active), logits on fixed inputs; all of it to an .npz.
_RELEASED_SIDE = """
import json, sys
import flax.traverse_util, jax, numpy as np
from md4.models import backward
kwargs, shape, out = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2])), sys.argv[3]
net = backward.DiscreteClassifier(**kwargs)
rng = np.random.default_rng(0)
z = rng.integers(0, kwargs["vocab_size"] + 1, (2,) + shape).astype(np.int32)
t = np.array([0.13, 0.71], np.float32)
flat = flax.traverse_util.flatten_dict(
    net.init({"params": jax.random.PRNGKey(0)}, z, t)["params"], sep="/")
for k, v in flat.items():
  scale = 1 / np.sqrt(np.prod(v.shape[:-1])) if v.ndim > 1 else 0.3
  flat[k] = (scale * rng.standard_normal(v.shape)).astype(np.float32)
logits, _ = net.apply({"params": flax.traverse_util.unflatten_dict(flat, sep="/")}, z, t)
np.savez(out, z=z, t=t, logits=np.asarray(logits), **{"param/" + k: v for k, v in flat.items()})
"""

_TEXT = dict(mlp_type="glu", depth_scaled_init=True, cond_type="adaln_zero")
# name: (released DiscreteClassifier arguments, example shape, dataset, our network, our fields)
CASES = {
    "text8": (dict(_TEXT, feature_dim=8, n_layers=2, num_heads=2, vocab_size=27,
                   outside_embed=True), (32,), "text8", "transformer",
              dict(num_layers=2, num_heads=2, d_model=16, cond_dim=8, embed_dim=8)),
    "openwebtext": (dict(_TEXT, feature_dim=8, n_layers=2, num_heads=5, vocab_size=27), (32,),
                    "shakespeare", "transformer",
                    dict(num_layers=2, num_heads=5, d_model=40, cond_dim=8)),
    "cifar10": (dict(feature_dim=64, n_layers=1, vocab_size=256), (32, 32, 3), "cifar10", "unet",
                dict(features=64, num_res_blocks=1)),
    "imagenet64": (dict(feature_dim=32, n_layers=1, n_dit_layers=2, dit_num_heads=2,
                        dit_hidden_size=32, vocab_size=256), (64, 64, 3), "imagenet64", "uvit",
                   dict(features=32, num_res_blocks=1, num_layers=2, num_heads=2, d_model=32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_parameters_give_the_released_codes_own_logits(name, tmp_path):
  kwargs, shape, dataset, network, fields = CASES[name]
  out = str(tmp_path / "released.npz")
  done = subprocess.run([sys.executable, "-c", _RELEASED_SIDE, json.dumps(kwargs),
                         json.dumps(shape), out], cwd=RELEASED,
                        env=dict(os.environ, PYTHONPATH=RELEASED),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  saved = np.load(out)
  released = {"classifier/" + k[len("param/"):]: saved[k] for k in saved.files
              if k.startswith("param/")}

  config = config_lib.base_config()
  config.data.dataset = dataset
  if len(shape) == 1:
    config.data.seq_length = shape[0]
  config.model.vocab_size = kwargs["vocab_size"]
  config.model.network = network
  config.model.net = fields
  cfg = config_lib.from_configdict(config)
  spec = pipeline.get_spec(cfg.data)
  params = convert.convert_params(flax.traverse_util.unflatten_dict(released, sep="/"), cfg, spec)
  ours = model.build_network(cfg, spec).apply({"params": params["net"]}, jnp.asarray(saved["z"]),
                                              jnp.asarray(saved["t"]))
  scale = np.abs(saved["logits"]).max()
  assert scale > 1.0
  np.testing.assert_allclose(np.asarray(ours), saved["logits"], atol=1e-4 * scale, rtol=0)
