"""Training: one path, jit over a device Mesh, from 1 CPU to a TPU slice.

Randomness is attached to examples, not to batches: each example's (t, z_t) comes from
fold_in(step key, its index in the global batch), and t is stratified over the global batch. So
gradient accumulation averages exactly the gradient of the large batch, and the number of devices
changes nothing but the speed. The step key is fold_in(seed key, step), so a resumed run replays
the same draws as an uninterrupted one (with the data stream's state saved in the checkpoint).
"""


import contextlib
import functools
import math
import os
import signal
import time
from typing import Callable, Iterator, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from md4 import checks, elbo, export, generate, model, paths, sharding, standalone
from md4.checkpoint import Checkpointer, Restored
from md4.config import Config
from md4.data import pipeline
from md4.data.pipeline import Dataset, DatasetSpec
from md4.evaluate import EvalResult, Evaluator
from md4.failures import StorageError, describe
from md4.metric_writer import MetricWriter
from md4.state import TrainState, fold_in_name, inference_params, stream_key
from md4.workdir_lock import WorkdirInUse, WorkdirLock


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")  # nats per token
  lr: clu_metrics.LastValue.from_output("lr")


@flax.struct.dataclass
class TrainMetricsWithGradNorm(clu_metrics.Collection):
  """With train.log_grad_norm. Not a subclass: clu reads a collection's metrics from the class's
  own annotations."""
  loss: clu_metrics.Average.from_output("loss")
  lr: clu_metrics.LastValue.from_output("lr")
  grad_norm: clu_metrics.Average.from_output("grad_norm")


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
  """Checks the whole config (md4.checks) against spec and the devices, then builds the pieces."""
  checks.check_config(cfg, spec, num_devices=len(jax.devices()) if mesh is None else mesh.size,
                      num_processes=jax.process_count())
  mesh = sharding.make_mesh(cfg.train.mesh_fsdp) if mesh is None else mesh
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
  label = model.class_labels(cfg, batch)
  if cfg.train.label_drop > 0:  # checks.check_config: only with a null class.
    # Folded in by name, not split off: the step's other draws are the same with and without it.
    label = model.drop_labels(label, fold_in_name(step_key, "label_drop"), cfg.train.label_drop,
                              model.null_label(cfg))
  per_example = {
      "x": batch["x"],
      "label": label,
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
  metrics = {"loss": loss, "lr": learning_rate_schedule(cfg)(state.step)}
  if cfg.train.log_grad_norm:
    metrics["grad_norm"] = optax.tree.norm(grads)
  return new_state, metrics


def compile_train_step(setup: Setup, abstract_state: TrainState) -> Callable:
  state_sharding = sharding.state_shardings(abstract_state, setup.mesh)
  return jax.jit(sharding.in_mesh(functools.partial(train_step, setup=setup), setup.mesh),
                 in_shardings=(state_sharding, sharding.batch_sharding(setup.mesh)),
                 out_shardings=(state_sharding, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def create_state(setup: Setup) -> TrainState:
  """A fresh state, initialised directly into its shardings."""
  rng = stream_key(setup.cfg.train.seed, "init")
  abstract = jax.eval_shape(functools.partial(init_state, setup), rng)
  return jax.jit(functools.partial(init_state, setup),
                 out_shardings=sharding.state_shardings(abstract, setup.mesh))(rng)


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


class HookError(RuntimeError):
  """A periodic evaluation or sample failed; the state of its step is saved."""


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def model_batch(local: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """(the arrays a step reads, "source_index"): where each example came from stays on the host."""
  inputs = dict(local)
  return inputs, inputs.pop("source_index", None)


def check_ids(batch: dict[str, np.ndarray], spec: DatasetSpec, dataset: Dataset,
              source_index: np.ndarray | None, step: int) -> None:
  """Refuses ids outside the dataset's vocabulary (and labels outside its classes) before they reach
  the network, where an out-of-range gather would be silently clamped or give NaN; the message names
  the dataset, where the example came from and the value. Two reductions per field: cheap against a
  step."""
  fields = [("x", spec.vocab_size)]
  if spec.num_classes and "label" in batch:
    fields.append(("label", spec.num_classes))
  for name, limit in fields:
    values = batch[name]
    if values.min() >= 0 and values.max() < limit:
      continue
    bad = (values < 0) | (values >= limit)
    row = int(np.argmax(bad.reshape(len(values), -1).any(axis=1)))
    value = int(values[row].reshape(-1)[np.argmax(bad[row].reshape(-1))])
    where = (dataset.describe_example("train", int(source_index[row])) if source_index is not None
             else f"{dataset.name} train batch row {row}")
    raise ValueError(f"bad {'token id' if name == 'x' else 'label'} {value} in {where} (training "
                     f"batch of step {step + 1}): valid {name} values are 0..{limit - 1}")


def train(cfg: Config, workdir: str, *, dataset: Dataset | None = None,
          mesh: Mesh | None = None, checkpoint_step: int | None = None) -> TrainResult:
  """Trains cfg in workdir, resuming from its newest intact checkpoint (or from checkpoint_step);
  returns the final state.

  The workdir's lock (md4.workdir_lock) is held throughout: a second run on it is refused. Order at
  each step: train, check, save (if due), then the hooks (eval, samples), so a failing hook loses
  nothing: its step is saved before the error is raised. Nothing non-finite is ever saved.
  """
  workdir = paths.resolve(workdir)
  if export.is_exported(workdir):
    raise ValueError(f"{workdir} is a model written by md4 export; train into another --workdir")
  dataset = pipeline.load(cfg.data) if dataset is None else dataset
  setup = make_setup(cfg, dataset.spec, mesh)
  with _hold_workdir(workdir) as lock:
    return _train(setup, dataset, workdir, lock, checkpoint_step)


@contextlib.contextmanager
def _hold_workdir(workdir: str) -> Iterator[WorkdirLock | None]:
  """The workdir's lock, held by process 0 for every process; the same error everywhere if it is
  taken."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, log=_log)
    try:
      lock.acquire()
    except WorkdirInUse as e:
      lock, error = None, e
  if jax.process_count() > 1:
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = WorkdirInUse(f"process 0 could not take the lock of the workdir {workdir} (its "
                           "output says who holds it)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


def _resume(checkpointer: Checkpointer, setup: Setup, abstract: TrainState, writer: MetricWriter,
            checkpoint_step: int | None) -> Restored | None:
  """The verified state to resume from, after clearing what killed runs left; newer checkpoints
  (unreadable ones, or all newer than checkpoint_step) are set aside so this run can write their
  steps again, and metrics.jsonl is cut back to the resumed step."""
  for path in checkpointer.remove_partial_saves():
    _log(f"removed {path}: the partial save of a run that was killed while saving")
  restored = checkpointer.restore(abstract, setup.tx.init, checkpoint_step)
  if restored is None:
    return None
  step = int(restored.state.step)
  reasons = {e.step: e.reason for e in restored.skipped}
  newer = [s for s in checkpointer.steps() if s > step]
  for s, path in zip(newer, checkpointer.set_aside(newer)):
    why = (f"it cannot be restored: {reasons[s]}" if s in reasons else
           f"--checkpoint_step={step} resumes from an older step")
    _log(f"set aside the checkpoint at step {s}, moved unchanged to {path}: {why}")
  dropped = writer.keep_until(step, drop_eval_at_step=step == setup.cfg.train.num_steps)
  if dropped:
    _log(f"dropped {dropped} record(s) past step {step} from {writer.path}: this run writes them "
         "again")
  return restored


def _train(setup: Setup, dataset: Dataset, workdir: str, lock: WorkdirLock | None,
           checkpoint_step: int | None) -> TrainResult:
  cfg, tcfg = setup.cfg, setup.cfg.train
  # The model's data and decoding (its tokenizer's files copied into the workdir by process 0),
  # recorded with every checkpoint so that the checkpoint needs no dataset to be used.
  description = standalone.describe_dataset(dataset, workdir, write=jax.process_index() == 0)
  checkpointer = Checkpointer(workdir, cfg, description=description)
  writer = MetricWriter(workdir)
  data_iter = dataset.train_iterator(tcfg.batch_size, tcfg.seed, jax.process_index(),
                                     jax.process_count(), cfg.data.num_workers)
  abstract = abstract_state(setup)
  restored = _resume(checkpointer, setup, abstract, writer, checkpoint_step)
  if restored is None:
    state = create_state(setup)
  else:
    state = restored.state
    if restored.data_state:
      data_iter.set_state(restored.data_state)
    else:
      _log("the checkpoint has no data stream state (a converted one): the stream starts afresh")
    for note in restored.notes:
      _log(note)
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
  saved = start if restored is not None else None

  def save(done, loss):
    nonlocal saved
    if lock is not None:
      lock.check()
    _check_finite(done, loss, state, saved, checkpointer.directory)
    checkpointer.save(state, data_iter.get_state())
    saved = done

  metrics_class = TrainMetricsWithGradNorm if tcfg.log_grad_norm else TrainMetrics
  collected, pending, last_log = None, None, (start, time.perf_counter())
  last_samples = None  # The judgement of the last step's samples (generate.sample_report), if any.
  preempted = False
  # The bar is closed before any error propagates, so the message is printed on its own line; the
  # stream's worker processes stop with the loop, not when the iterator is garbage collected.
  with (_storage_errors(checkpointer), _Preemption() as preemption, contextlib.closing(bar),
        contextlib.closing(data_iter)):
    for step in range(start, tcfg.num_steps):
      local, source_index = model_batch(next(data_iter))
      check_ids(local, dataset.spec, dataset, source_index, step)
      batch = sharding.global_batch(local, setup.mesh)
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, batch)
      # Check the previous step's loss now, while this one runs: no stall, one step of lag.
      if pending is not None:
        _check_loss(*pending)
      done = step + 1
      pending = (done, metrics["loss"])
      single = metrics_class.single_from_model_output(**metrics)
      collected = single if collected is None else collected.merge(single)
      bar.update(1)
      if done % tcfg.log_every == 0 or done == tcfg.num_steps:
        _check_loss(*pending)
        values = collected.compute()
        now = time.perf_counter()
        rate = (done - last_log[0]) / (now - last_log[1])
        last_log, collected = (done, now), None
        bits = float(values["loss"]) / math.log(2.0)
        bar.set_postfix(loss_bits=f"{bits:.3f}")
        scalars = {"train/loss_bits": bits, "train/lr": values["lr"],
                   "train/steps_per_sec": rate}
        if tcfg.log_grad_norm:
          scalars["train/grad_norm"] = values["grad_norm"]
        if cfg.model.state_dependent:
          power = jax.nn.softplus(state.params["schedule"]["raw_power"])
          scalars.update({"train/power_mean": jnp.mean(power), "train/power_min": jnp.min(power),
                          "train/power_max": jnp.max(power)})
        writer.write(done, scalars)
      stop = preemption.stop_after(done)
      if done % tcfg.checkpoint_every == 0 or done == tcfg.num_steps or stop:
        save(done, metrics["loss"])
      if stop:
        _log(f"SIGTERM: saved the checkpoint at step {done} and stopped")
        preempted = True
        break
      hooks = []
      if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.num_steps:
        hooks.append(("evaluation", functools.partial(_periodic_eval, evaluator, state, dataset,
                                                      cfg, writer, done)))
      if tcfg.sample_every and done % tcfg.sample_every == 0:
        hooks.append(("sample", functools.partial(_write_samples, sampler, state, dataset, cfg,
                                                  workdir, done)))
      for name, hook in hooks:
        try:
          judged = hook()
          if name == "sample" and done == tcfg.num_steps:
            last_samples = judged
        except Exception as e:
          if saved != done:
            save(done, metrics["loss"])
          raise HookError(f"the {name} hook failed after step {done} ({type(e).__name__}: {e}); "
                          f"the checkpoint of step {done} is saved in {checkpointer.directory}, "
                          "so a rerun resumes from it") from e
  if pending is not None:
    _check_loss(*pending)
  if preempted:
    return TrainResult(state, None, True)
  with _storage_errors(checkpointer):
    result = evaluator(inference_params(state, cfg, "eval"), dataset)
    writer.write(int(state.step), result.metrics())
  _report(result, dataset, cfg, last_samples)
  return TrainResult(state, result, False)


@contextlib.contextmanager
def _storage_errors(checkpointer: Checkpointer) -> Iterator[None]:
  """An OSError (a full disk, a lost permission, an I/O error) becomes one StorageError naming the
  file, the cause and the last good checkpoint."""
  try:
    yield
  except OSError as e:
    raise StorageError(f"{describe(e)}; {checkpointer.last_good_text()}") from e


def _check_loss(step: int, loss: jax.Array) -> None:
  value = float(loss)
  if not math.isfinite(value):
    raise FloatingPointError(f"training loss is {value} at step {step}; stopping (lower "
                             "optimizer.lr, or check the data)")


def _check_finite(step: int, loss: jax.Array, state: TrainState, saved: int | None,
                  directory: str) -> None:
  """Before a save: the step's loss and every parameter (raw and EMA) must be finite."""
  last = (f"the last checkpoint is step {saved} in {directory}" if saved is not None else
          "no checkpoint was written")
  if not math.isfinite(float(loss)):
    raise FloatingPointError(f"training loss is {float(loss)} at step {step}; not saving a "
                             f"non-finite state ({last}); lower optimizer.lr or check the data")
  if not bool(_all_finite((state.params, state.ema_params))):
    raise FloatingPointError(f"non-finite parameters at step {step}; not saving them ({last}); "
                             "lower optimizer.lr or check the data")


def _periodic_eval(evaluator, state, dataset, cfg, writer, step) -> None:
  result = evaluator(inference_params(state, cfg, "eval"), dataset,
                     max_examples=cfg.train.eval_batches * cfg.eval.batch_size)
  writer.write(step, result.metrics())
  _log(f"step {step}: eval {result.summary()}")


def _write_samples(sampler, state, dataset, cfg, workdir, step) -> str | None:
  """Draws and writes the step's samples; returns the line judging them, if a judge applies
  (generate.sample_report), which is logged here except at the last step (the final report
  prints it beside the bound)."""
  rng = jax.random.fold_in(stream_key(cfg.train.seed, "sample_hook"), step)
  drawn = generate.draw(sampler, inference_params(state, cfg, "sample"), rng, dataset, cfg,
                        os.path.join(workdir, "samples", f"step_{step}"))
  if drawn.path is None:
    return None
  first = dataset.decode(drawn.samples[0]) if dataset.spec.kind == "text" else None
  report = generate.sample_report(dataset, drawn.samples, drawn.labels)
  later = report if report and step != cfg.train.num_steps else None
  _log(f"step {step}: samples written to {drawn.path}" + (f"\n  {first[:200]!r}" if first else "")
       + (f"\n  {later}" if later else ""))
  return report


def _report(result: EvalResult, dataset: Dataset, cfg: Config, samples: str | None) -> None:
  """The final evaluation, the dataset's reference number and, if the last step's samples were
  judged, that judgement."""
  line = f"eval ({cfg.eval.split}): {result.summary()}"
  baseline = dataset.baseline()
  if baseline is not None:
    line += f"\n  reference: {baseline[0]:.4f} bits/{result.unit}, the {baseline[1]}"
  if samples is not None:
    line += f"\n  samples of step {cfg.train.num_steps}: {samples}"
  _log(line)
