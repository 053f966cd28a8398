"""Every attention implementation that runs on this backend, timed on the same inputs.

  python benchmarks/attention.py --shape=1,1024,12,64 --shape=16,256,4,64

For each shape [B, L, N, H] (float32 unless --dtype): the median time of the forward pass and of
the gradient with respect to q, k and v, over --repeats runs after one untimed run, one line per
implementation (md4.networks.attention.ATTENTION_IMPLS; None is the backend's default choice, and
cuDNN needs an NVIDIA GPU and half precision). What attention_impl=None picks per backend
(attention.default_impl) follows these measurements.
"""

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from md4.networks import attention  # noqa: E402


def _median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", action="append", default=[],
                      help="B,L,N,H (repeatable; default 1,1024,12,64 and 16,256,4,64)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] or [(1, 1024, 12, 64),
                                                                         (16, 256, 4, 64)]
  dtype = jnp.dtype(args.dtype)
  backend = jax.default_backend()
  print(f"backend {backend} ({jax.devices()[0].device_kind}), {dtype.name}, median of "
        f"{args.repeats} runs")
  print("| [B, L, N, H] | implementation | forward (ms) | gradient (ms) |")
  print("|---|---|---|---|")
  for shape in shapes:
    q, k, v = (jax.random.normal(key, shape, dtype)
               for key in jax.random.split(jax.random.key(0), 3))
    for impl in attention.ATTENTION_IMPLS:
      try:
        attention.check_impl(impl, dtype)
        forward = jax.jit(lambda q, k, v, impl=impl: attention.attend(q, k, v, impl=impl))
        grad = jax.jit(jax.grad(
            lambda q, k, v, impl=impl: attention.attend(q, k, v, impl=impl).astype(
                jnp.float32).sum(), argnums=(0, 1, 2)))
        cells = [f"{_median_ms(f, (q, k, v), args.repeats):.1f}" for f in (forward, grad)]
      except Exception as e:  # noqa: BLE001  (cuDNN off a GPU: say why, time the others)
        cells = [f"does not run here ({type(e).__name__})", ""]
      name = f"None ({attention.chosen_impl(dtype, shape[-1])})" if impl is None else impl
      print(f"| {list(shape)} | {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
  main()
