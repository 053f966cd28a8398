"""Training: one path, jit over a device Mesh, from 1 CPU to a TPU slice.

Randomness is attached to examples, not to batches: each example's (t, z_t) comes from
fold_in(step key, its index in the global batch), and t is stratified over the global batch. So
gradient accumulation averages exactly the gradient of the large batch, and the number of devices
changes nothing but the speed. The step key is fold_in(seed key, step), so a resumed run replays
the same draws as an uninterrupted one (with the data stream's state saved in the checkpoint).
"""


import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from md4 import config as config_lib
from md4 import elbo, generate, model, sharding
from md4.config import Config
from md4.data import pipeline
from md4.data.pipeline import Dataset, DatasetSpec
from md4.evaluate import EvalResult, Evaluator
from md4.metric_writer import MetricWriter


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # uint32[2]: raw key data, so checkpoints hold plain arrays.


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")  # nats per token
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  lr: clu_metrics.LastValue.from_output("lr")


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  opt = cfg.optimizer
  warmup = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
  if opt.decay == "constant":
    after = optax.constant_schedule(opt.lr)
  else:
    after = optax.cosine_decay_schedule(opt.lr, max(cfg.train.num_steps - opt.warmup_steps, 1),
                                        alpha=opt.min_lr_ratio)
  return optax.join_schedules([warmup, after], [opt.warmup_steps])


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  opt = cfg.optimizer
  # Decay matrices only: not norms, biases, embeddings' scale-free parts or GenMD4's exponents.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=opt.b1, b2=opt.b2, eps=opt.adam_eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


class Setup(NamedTuple):
  """The static pieces of a run, built once from the config."""
  cfg: Config
  spec: DatasetSpec
  network: nn.Module
  tx: optax.GradientTransformation
  mesh: Mesh


def make_setup(cfg: Config, spec: DatasetSpec, mesh: Mesh | None = None) -> Setup:
  mesh = sharding.make_mesh(cfg.train.mesh_fsdp) if mesh is None else mesh
  sharding.check_batch_size(cfg.train.batch_size // cfg.train.grad_accum_steps, mesh,
                            "train.batch_size / train.grad_accum_steps")
  if cfg.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must split evenly over "
                     f"{jax.process_count()} processes")
  return Setup(cfg, spec, model.build_network(cfg, spec), make_optimizer(cfg), mesh)


def init_state(setup: Setup, rng: jax.Array) -> TrainState:
  k_params, k_train = jax.random.split(rng)
  params = model.init_params(k_params, setup.network, setup.cfg.model, setup.spec)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=setup.tx.init(params), ema_params=params,
                    rng=jax.random.key_data(k_train))


def _microbatch_loss(params, x, label, keys, times, dropout_rng, *, setup: Setup):
  cfg = setup.cfg
  dropout = dropout_rng if cfg.model.net.get("dropout_rate", 0.0) > 0 else None
  losses = model.OBJECTIVES[cfg.model.objective].training(cfg, setup.network, params, x, keys,
                                                          times, label, dropout)
  return losses.mean() / setup.spec.tokens_per_example  # nats per token


def _split_microbatches(tree, num: int):
  """[B, ...] -> [num, B / num, ...], microbatch a = examples a, a + num, ...: each microbatch is
  spread over all devices, as the batch is."""
  return jax.tree.map(lambda v: v.reshape((v.shape[0] // num, num) + v.shape[1:]).swapaxes(0, 1),
                      tree)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, setup: Setup
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; pure, jitted once."""
  cfg = setup.cfg
  b = batch["x"].shape[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_examples, k_times, k_dropout = jax.random.split(step_key, 3)
  per_example = {
      "x": batch["x"],
      "label": model.class_labels(cfg, batch),
      "keys": jax.vmap(lambda i: jax.random.fold_in(k_examples, i))(jnp.arange(b)),
      "times": elbo.sample_times(k_times, b),
  }
  num_micro = cfg.train.grad_accum_steps
  micro = _split_microbatches({k: v for k, v in per_example.items() if v is not None}, num_micro)
  grad_fn = jax.value_and_grad(functools.partial(_microbatch_loss, setup=setup))

  def accumulate(carry, inputs):
    a, mb = inputs
    loss, grads = grad_fn(state.params, mb["x"], mb.get("label"), mb["keys"], mb["times"],
                          jax.random.fold_in(k_dropout, a))
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
  if num_micro == 1:  # No loop: XLA:CPU differentiates convolutions inside loops ~20x slower.
    (loss, grads), _ = accumulate(zeros, (jnp.zeros((), jnp.int32),
                                          jax.tree.map(lambda v: v[0], micro)))
  else:
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), micro))
    loss, grads = jax.tree.map(lambda v: v / num_micro, (loss, grads))

  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The EMA warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by init.
  decay = jnp.minimum(cfg.optimizer.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": learning_rate_schedule(cfg)(state.step)}
  return new_state, metrics


def compile_train_step(setup: Setup, abstract_state: TrainState) -> Callable:
  state_sharding = sharding.state_shardings(abstract_state, setup.mesh)
  return jax.jit(functools.partial(train_step, setup=setup),
                 in_shardings=(state_sharding, sharding.batch_sharding(setup.mesh)),
                 out_shardings=(state_sharding, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def create_state(setup: Setup) -> TrainState:
  """A fresh state, initialised directly into its shardings."""
  rng = jax.random.key(setup.cfg.train.seed)
  abstract = jax.eval_shape(functools.partial(init_state, setup), rng)
  return jax.jit(functools.partial(init_state, setup),
                 out_shardings=sharding.state_shardings(abstract, setup.mesh))(rng)


class Checkpointer:
  """Orbax checkpoints of the state, the data stream's state and the config, written atomically.

  A checkpoint whose model differs from this config's (config.STATE_DEFINING_KEYS) is refused.
  """

  def __init__(self, workdir: str, cfg: Config, *, read_only: bool = False):
    self.cfg = cfg
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.train.keep_checkpoints, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
    meta = {"fingerprint": config_lib.state_fingerprint(self.cfg),
            "config": config_lib.to_dict(self.cfg)}
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def check_compatible(self, step: int) -> None:
    meta = _read_meta(self.manager, step)
    ours = json.loads(json.dumps(config_lib.state_fingerprint(self.cfg)))
    # A key added to the fingerprint after a checkpoint was written meant its default then.
    defaults = json.loads(json.dumps(config_lib.state_fingerprint(Config())))
    theirs = {k: meta["fingerprint"].get(k, defaults[k]) for k in ours}
    diffs = [f"{k}: checkpoint has {theirs[k]!r}, config has {v!r}"
             for k, v in ours.items() if theirs[k] != v]
    if diffs:
      raise ValueError(f"the checkpoint at step {step} in {self.directory} belongs to another model "
                       "config; refusing to restore it:\n  " + "\n  ".join(diffs))

  def restore(self, abstract_state: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict[str, Any]] | None:
    """(state, data_state) at `step` (default: the latest), or None when there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if step not in self.manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory}; steps there: "
                       f"{sorted(self.manager.all_steps())}")
    self.check_compatible(step)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def read_checkpoint_config(workdir: str, step: int | None = None) -> Config:
  """The config a checkpoint in workdir was written with (its own record), for readers that know
  only the workdir, such as a judge. step: default the latest."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoint in {directory}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_names=("state", "data", "meta")) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {directory}")
    meta = _read_meta(manager, step)
  return config_lib.from_configdict(meta["config"])


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON record a checkpoint keeps beside the state: its fingerprint and config."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def abstract_state(setup: Setup) -> TrainState:
  """ShapeDtypeStructs with shardings: what Orbax restores into."""
  shapes = jax.eval_shape(functools.partial(init_state, setup), jax.random.key(0))
  shardings = sharding.state_shardings(shapes, setup.mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


class _Preemption:
  """Turns SIGTERM into a stop the loop checks after each step, so it can save before exiting.

  With several processes the stop must come at the same step everywhere (saving is collective), but
  SIGTERM reaches each process at its own moment: there JAX's preemption service, which catches
  SIGTERM once jax.distributed is initialized, agrees on the step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if self._multiprocess:  # Leave SIGTERM to JAX's handler.
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def stop_after(self, step: int) -> bool:
    """Whether to save and stop after `step`; called after every step, in every process."""
    if self._multiprocess:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class TrainResult(NamedTuple):
  state: TrainState
  eval: EvalResult | None
  preempted: bool


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def train(cfg: Config, workdir: str, *, dataset: Dataset | None = None,
          mesh: Mesh | None = None) -> TrainResult:
  """Trains cfg in workdir, resuming from its latest checkpoint; returns the final state."""
  dataset = pipeline.load(cfg.data) if dataset is None else dataset
  setup = make_setup(cfg, dataset.spec, mesh)
  tcfg = cfg.train
  checkpointer = Checkpointer(workdir, cfg)
  writer = MetricWriter(workdir)
  data_iter = dataset.train_iterator(tcfg.batch_size, tcfg.seed, jax.process_index(),
                                     jax.process_count(), cfg.data.num_workers)
  abstract = abstract_state(setup)
  restored = checkpointer.restore(abstract)
  if restored is None:
    state = create_state(setup)
  else:
    state, data_state = restored
    data_iter.set_state(data_state)
    _log(f"resumed from step {int(state.step)} in {checkpointer.directory}")
  step_fn = compile_train_step(setup, abstract)
  evaluator = Evaluator(setup.network, cfg, setup.mesh)
  sampler = generate.Sampler(setup.network, cfg)
  start = int(state.step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  _log(f"{cfg.model.network} with {num_params / 1e6:.2f}M parameters on {setup.mesh.size} "
       f"device(s) {dict(setup.mesh.shape)}; steps {start} -> {tcfg.num_steps}")

  bar = tqdm.tqdm(total=tcfg.num_steps, initial=start, unit="step", dynamic_ncols=True,
                  disable=not tcfg.progress_bar or jax.process_index() != 0)
  collected, pending, last_log = None, None, (start, time.perf_counter())
  preempted = False
  with _Preemption() as preemption:
    for step in range(start, tcfg.num_steps):
      batch = sharding.global_batch(next(data_iter), setup.mesh)
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, batch)
      # Check the previous step's loss now, while this one runs: no stall, one step of lag.
      if pending is not None:
        _check_finite(*pending)
      pending = (step + 1, metrics["loss"])
      single = TrainMetrics.single_from_model_output(**metrics)
      collected = single if collected is None else collected.merge(single)
      bar.update(1)
      done = step + 1
      if done % tcfg.log_every == 0 or done == tcfg.num_steps:
        _check_finite(*pending)
        values = collected.compute()
        now = time.perf_counter()
        rate = (done - last_log[0]) / (now - last_log[1])
        last_log, collected = (done, now), None
        bits = float(values["loss"]) / math.log(2.0)
        bar.set_postfix(loss_bits=f"{bits:.3f}")
        scalars = {"train/loss_bits": bits, "train/grad_norm": values["grad_norm"],
                   "train/lr": values["lr"], "train/steps_per_sec": rate}
        if cfg.model.state_dependent:
          power = jax.nn.softplus(state.params["schedule"]["raw_power"])
          scalars.update({"train/power_mean": jnp.mean(power), "train/power_min": jnp.min(power),
                          "train/power_max": jnp.max(power)})
        writer.write(done, scalars)
      if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.num_steps:
        result = evaluator(state.ema_params, dataset, max_examples=tcfg.eval_batches *
                           cfg.eval.batch_size)
        writer.write(done, result.metrics())
        _log(f"step {done}: eval {result.summary()}")
      if tcfg.sample_every and done % tcfg.sample_every == 0:
        _write_samples(sampler, state, dataset, cfg, workdir, done)
      stop = preemption.stop_after(done)
      if done % tcfg.checkpoint_every == 0 or done == tcfg.num_steps or stop:
        checkpointer.save(state, data_iter.get_state())
      if stop:
        _log(f"SIGTERM: saved the checkpoint at step {done} and stopped")
        preempted = True
        break
  bar.close()
  if pending is not None:
    _check_finite(*pending)
  if preempted:
    return TrainResult(state, None, True)
  result = evaluator(state.ema_params if cfg.eval.use_ema else state.params, dataset)
  writer.write(int(state.step), result.metrics())
  _report(result, dataset, cfg)
  return TrainResult(state, result, False)


def _check_finite(step: int, loss: jax.Array) -> None:
  value = float(loss)
  if not math.isfinite(value):
    raise FloatingPointError(f"training loss is {value} at step {step}; stopping (lower "
                             "optimizer.lr, or check the data)")


def _write_samples(sampler, state, dataset, cfg, workdir, step) -> None:
  spec = dataset.spec
  n = cfg.sample.num_samples
  init = generate.unconditional_init(spec, n, cfg.model.vocab_size)
  labels = generate.default_labels(spec, n, model.is_conditional(cfg))
  params = state.ema_params if cfg.sample.use_ema else state.params
  rng = jax.random.fold_in(jax.random.key(cfg.train.seed + 2), step)
  samples = np.asarray(sampler(params, rng, init, labels).samples)
  if jax.process_index() != 0:
    return
  path = generate.write_samples(dataset, samples, os.path.join(workdir, "samples", f"step_{step}"))
  first = dataset.decode(samples[0]) if spec.kind == "text" else None
  _log(f"step {step}: samples written to {path}" + (f"\n  {first[:200]!r}" if first else ""))


def _report(result: EvalResult, dataset: Dataset, cfg: Config) -> None:
  line = f"eval ({cfg.eval.split}): {result.summary()}"
  baseline = dataset.baseline()
  if baseline is not None:
    line += f"\n  reference: {baseline[0]:.4f} bits/{result.unit}, the {baseline[1]}"
  _log(line)
