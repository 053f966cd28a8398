"""md4/hlo.py: FLOPs, memory traffic and collectives of a compiled program, read from its HLO text,
against counts made by hand."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from md4 import aot, chips, hlo

HLO = """HloModule step

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %ag = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %x), replica_groups={}, dimensions={0}
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ag)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %ar = f32[16]{0} all-reduce(f32[16]{0} %a), to_apply=%add
  %cp = (bf16[2,3]{1,0}, bf16[2,3]{1,0}, u32[], u32[]) collective-permute-start(bf16[2,3]{1,0} %b)
  %cpd = bf16[2,3]{1,0} collective-permute-done(%cp)
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[16]{0} add(%ar, %ar)
}
"""


def test_collectives_are_counted_once_each_and_loop_bodies_by_their_trip_count():
  """all-reduce f32[16] (64 bytes) + one collective-permute of bf16[2,3] counted at its start only
  (12 bytes) + an all-gather of f32[8,4] (128 bytes) in a loop of 5 trips = 716 bytes."""
  assert hlo.costs(HLO).collective_bytes == 64 + 12 + 5 * 128


def _step(a, b):
  """7 chained [64, 64] products in a loop, then a batched product [4, 64, 32] x [4, 32, 16]."""
  c = jax.lax.scan(lambda c, _: (jnp.tanh(c @ a), None), a, None, length=7)[0]
  return c, jnp.einsum("bij,bjk->bik", b[:, :, :32], b[:, :32, :16])


EXPECTED_FLOPS = 7 * 2 * 64**3 + 2 * 4 * 64 * 32 * 16


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_matrix_product_flops_of_a_compiled_program_count_every_trip(platform):
  """2 m n k per product, the loop's seven times (XLA's cost analysis counts its body once), on the
  CPU and compiled for a TPU v5e, whose compiler writes the batched product as a convolution with a
  dilated window."""
  device = (jax.devices("cpu")[0] if platform == "cpu" else
            aot.slice_devices(chips.get_slice("v5e-1"))[0])
  where = NamedSharding(jax.sharding.Mesh([device], ("x",)), P())
  args = (jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=where),
          jax.ShapeDtypeStruct((4, 64, 64), jnp.float32, sharding=where))
  compiled = jax.jit(_step).lower(*args).compile()
  costs = hlo.costs(compiled.as_text())
  assert costs.flops == EXPECTED_FLOPS
  assert costs.bytes_accessed >= 4 * (64 * 64 + 4 * 64 * 64)  # At least the inputs are read.
  if platform == "cpu":
    assert compiled.cost_analysis()["flops"] < EXPECTED_FLOPS  # The loop counted once.


# cuDNN's attention as the GPU step lowers it (md4/networks/attention.py, impl="cudnn"): results
# [B=2, heads=3, L=128, H=8] (the layout {3,1,2,0} stores L outside heads; the shape is logical).
CUDNN_HLO = """HloModule step

ENTRY %main (q: bf16[2,128,3,8]) -> bf16[2,3,128,8] {
  %q = bf16[2,128,3,8]{3,2,1,0} parameter(0)
  %fwd = (bf16[2,3,128,8]{3,1,2,0}, f32[2,3,128]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %bwd = (bf16[2,3,128,8]{3,1,2,0}, bf16[2,3,128,8]{3,1,2,0}, bf16[2,3,128,8]{3,1,2,0}, u8[0]{0}) custom-call(%q, %q, %q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  ROOT %o = bf16[2,3,128,8]{3,1,2,0} get-tuple-element(%fwd), index=0
}
"""


def test_cudnn_attention_flops_are_those_of_its_products():
  """Forward q k^T and p v, backward five products, each 2 L L H per head and example."""
  assert hlo.costs(CUDNN_HLO).flops == (2 + 5) * 2 * 2 * 3 * 128 * 128 * 8
