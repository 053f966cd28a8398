"""The paper's released networks (google-deepmind/md4), as data and in NumPy, for converter tests.

Written from reading the released code, not imported from it: `*_tree` give the released module
names and shapes of a parameter tree (what its Flax modules create, in their creation order), and
`*_logits` the released forward passes, in float64, over such a tree. Only the time-conditioned
networks the paper trains are covered: text transformer (MD4/GenMD4 on text8 and OpenWebText),
single-resolution UNet (CIFAR-10), U-ViT (ImageNet 64x64).
"""

from __future__ import annotations

import math

import numpy as np

C = "classifier"
T = f"{C}/Transformer_0"
U = f"{C}/UNet5DWrapper_0/UNet_0"
GROUPS = 32  # Flax's GroupNorm default, which the released UNets use.


def _dense(tree, path, fan_in, fan_out, bias=True):
  tree[f"{path}/kernel"] = (fan_in, fan_out)
  if bias:
    tree[f"{path}/bias"] = (fan_out,)


def _cond_embed(tree, f, classes):
  _dense(tree, f"{C}/CondEmbedding_0/dense0", f + (f if classes else 0), 4 * f)
  _dense(tree, f"{C}/CondEmbedding_0/Dense_0", 4 * f, f)
  if classes:
    tree["cond_embeddings/embedding"] = (classes, f)


def released_hidden(d):
  """FeedForward's width: int(2 * 4d / 3) rounded up to a multiple of 32."""
  return 32 * math.ceil(int(2 * (4 * d) / 3) / 32)


def transformer_tree(vocab, feature_dim, heads, layers, outside_embed, genmd4=False):
  """DiscreteClassifier over tokens: dim = feature_dim * heads."""
  d, f, h = feature_dim * heads, feature_dim, released_hidden(feature_dim * heads)
  tree = {}
  _cond_embed(tree, f, 0)
  if outside_embed:
    tree[f"{C}/Embed_0/embedding"] = (vocab + 1, f)
    _dense(tree, f"{T}/Dense_0", f, d)
    final = (f"{T}/Dense_1", f"{T}/Dense_2")
  else:
    tree[f"{T}/Embed_0/embedding"] = (vocab + 1, d)
    final = (f"{T}/Dense_0", f"{T}/Dense_1")
  for i in range(layers):
    b = f"{T}/TransformerBlock_{i}"
    _dense(tree, f"{b}/Dense_0", f, 6 * d)
    for w in ("wq", "wk", "wv", "wo"):
      _dense(tree, f"{b}/attention/{w}", d, d, bias=False)
    _dense(tree, f"{b}/feed_forward/w1", d, h, bias=False)
    _dense(tree, f"{b}/feed_forward/w2", h, d, bias=False)
    _dense(tree, f"{b}/feed_forward/w3", d, h, bias=False)
  _dense(tree, final[0], f, 2 * d)
  _dense(tree, final[1], d, vocab, bias=False)
  if genmd4:
    tree["noise_schedule/w"] = (vocab,)
  return tree


def _conv(tree, path, k, cin, cout):
  tree[f"{path}/kernel"] = (k, k, cin, cout)
  tree[f"{path}/bias"] = (cout,)


def unet_tree(feature_dim, n_layers, channels=3, vocab=256, classes=0):
  f = feature_dim
  tree = {}
  _cond_embed(tree, f, classes)
  tree[f"{C}/Embed_0/embedding"] = (vocab + 1, f)
  _conv(tree, f"{U}/Conv_0", 3, channels * f, f)
  for k in range(2 * n_layers + 3):  # Down, two middle, up.
    cin = 2 * f if k >= n_layers + 2 else f
    b = f"{U}/ResBlock_{k}"
    tree[f"{b}/GroupNorm_0/scale"] = tree[f"{b}/GroupNorm_0/bias"] = (cin,)
    _conv(tree, f"{b}/Conv_0", 3, cin, f)
    _dense(tree, f"{b}/Dense_0", f, f, bias=False)
    tree[f"{b}/GroupNorm_1/scale"] = tree[f"{b}/GroupNorm_1/bias"] = (f,)
    _conv(tree, f"{b}/Conv_1", 3, f, f)
    if cin != f:
      _dense(tree, f"{b}/Dense_1", cin, f)
  a = f"{U}/SelfAttention_0"
  tree[f"{a}/GroupNorm_0/scale"] = tree[f"{a}/GroupNorm_0/bias"] = (f,)
  for proj in ("query", "key", "value"):
    tree[f"{a}/MultiHeadDotProductAttention_0/{proj}/kernel"] = (f, 1, f)
    tree[f"{a}/MultiHeadDotProductAttention_0/{proj}/bias"] = (1, f)
  tree[f"{a}/MultiHeadDotProductAttention_0/out/kernel"] = (1, f, f)
  tree[f"{a}/MultiHeadDotProductAttention_0/out/bias"] = (f,)
  tree[f"{U}/GroupNorm_0/scale"] = tree[f"{U}/GroupNorm_0/bias"] = (f,)
  _conv(tree, f"{U}/Conv_1", 3, f, channels * vocab)
  return tree


def uvit_tree(feature_dim, n_layers, dit_layers, hidden, image=64, channels=3, vocab=256):
  f, d = feature_dim, hidden
  dit = f"{U}/DiT_0"
  tree = {}
  _cond_embed(tree, f, 0)
  tree[f"{C}/Embed_0/embedding"] = (vocab + 1, f)
  _conv(tree, f"{U}/Conv_0", 3, channels * f, f)
  for k in range(2 * n_layers + 1):
    cin = 2 * f if k >= n_layers else f
    b = f"{U}/ResBlock_{k}"
    _dense(tree, f"{b}/CondGroupNorm_0/Dense_0", f, 2 * cin)
    _conv(tree, f"{b}/Conv_0", 3, cin, f)
    _dense(tree, f"{b}/CondGroupNorm_1/Dense_0", f, 2 * f)
    _conv(tree, f"{b}/Conv_1", 3, f, f)
    if cin != f:
      _dense(tree, f"{b}/Dense_0", cin, f)
  _conv(tree, f"{dit}/x_embedder/proj", 2, f, d)
  tree[f"{dit}/pos_embed"] = ((image // 2) ** 2, d)
  for i in range(dit_layers):
    b = f"{dit}/blocks_{i}"
    _dense(tree, f"{b}/Dense_0", f, 6 * d)
    for w in ("wq", "wk", "wv"):
      _dense(tree, f"{b}/attn/{w}", d, d)
    _dense(tree, f"{b}/attn/wo", d, d, bias=False)
    _dense(tree, f"{b}/mlp/fc1", d, 4 * d)
    _dense(tree, f"{b}/mlp/fc2", 4 * d, d)
  _dense(tree, f"{dit}/final_layer/Dense_0", f, 2 * d)
  _dense(tree, f"{dit}/final_layer/linear", d, 4 * f)
  _dense(tree, f"{U}/CondGroupNorm_0/Dense_0", f, 2 * f)
  _conv(tree, f"{U}/Conv_1", 3, f, channels * vocab)
  return tree


def random_tree(shapes, seed):
  """Random values for every tensor, 1/sqrt(fan in) scaled so activations stay O(1); no zeros, so
  the zero-initialised released layers are active."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in shapes.items():
    fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
    scale = 1 / math.sqrt(fan_in) if len(shape) > 1 else 0.3
    out[path] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return out


def nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# ------------------------------------------------------------------------------ forward passes

def _lin(p, path, x):
  y = x @ p[f"{path}/kernel"].astype(np.float64)
  return y + p[f"{path}/bias"] if f"{path}/bias" in p else y


def _swish(x):
  return x / (1 + np.exp(-x))


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _layer_norm(x, eps):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _cond(p, t, f, labels=None):
  """CondEmbedding(f)(1000 t, class embedding)."""
  half = f // 2
  freqs = np.exp(-math.log(10_000) / (half - 1) * np.arange(half))
  args = (1000 * np.asarray(t, np.float64))[:, None] * freqs[None]
  c = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  if labels is not None:
    c = np.concatenate([c, p["cond_embeddings/embedding"][labels]], axis=1)
  c = _swish(_lin(p, f"{C}/CondEmbedding_0/dense0", c))
  return _lin(p, f"{C}/CondEmbedding_0/Dense_0", c)


def _rope_interleaved(x, theta=10_000.0):
  """x: [B, L, N, H]; rotates pairs (2i, 2i+1) by position * theta^(-2i/H)."""
  _, length, _, h = x.shape
  angles = np.arange(length)[:, None] * theta ** (-np.arange(0, h, 2) / h)[None]
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = a * cos - b * sin
  out[..., 1::2] = a * sin + b * cos
  return out


def _attention(q, k, v):
  """[B, L, N, H] each; softmax(q k / sqrt(H)) v."""
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(q.shape[-1])
  return np.einsum("bnqk,bknh->bqnh", _softmax(scores), v)


def transformer_logits(p, z, t, vocab, feature_dim, heads, layers, outside_embed):
  """The released MD4 text network (mlp_type "glu", cond_type "adaln_zero"): float64[B, L, V]."""
  d = feature_dim * heads
  c = _cond(p, t, feature_dim)
  if outside_embed:
    h = _lin(p, f"{T}/Dense_0", p[f"{C}/Embed_0/embedding"][z].astype(np.float64))
    final = (f"{T}/Dense_1", f"{T}/Dense_2")
  else:
    h = p[f"{T}/Embed_0/embedding"][z].astype(np.float64)
    final = (f"{T}/Dense_0", f"{T}/Dense_1")
  b_, length = z.shape
  split = lambda x: x.reshape(b_, length, heads, feature_dim)
  for i in range(layers):
    blk = f"{T}/TransformerBlock_{i}"
    mod = _lin(p, f"{blk}/Dense_0", _sigmoid(c))[:, None]
    sa, ca, ga, sm, cm, gm = np.split(mod, 6, axis=-1)
    x = _layer_norm(h, 1e-5) * (ca + 1) + sa
    q, k = (_rope_interleaved(split(_lin(p, f"{blk}/attention/{w}", x))) for w in ("wq", "wk"))
    a = _attention(q, k, split(_lin(p, f"{blk}/attention/wv", x))).reshape(b_, length, d)
    h = h + ga * _lin(p, f"{blk}/attention/wo", a)
    x = _layer_norm(h, 1e-5) * (cm + 1) + sm
    ff = _sigmoid(_lin(p, f"{blk}/feed_forward/w1", x)) * _lin(p, f"{blk}/feed_forward/w3", x)
    h = h + gm * _lin(p, f"{blk}/feed_forward/w2", ff)
  shift, scale = np.split(_lin(p, final[0], _sigmoid(c))[:, None], 2, axis=-1)
  return _lin(p, final[1], _layer_norm(h, 1e-5) * (scale + 1) + shift)


def _group_norm(x, scale=None, bias=None, eps=1e-6):
  b, hh, ww, ch = x.shape
  g = x.reshape(b, hh, ww, GROUPS, ch // GROUPS)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  out = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return out if scale is None else out * scale + bias


def _conv3x3(p, path, x):
  """SAME-padded 3x3 convolution with bias; x: [B, H, W, Cin]."""
  kernel = p[f"{path}/kernel"].astype(np.float64)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  hh, ww = x.shape[1:3]
  out = sum(np.einsum("bhwc,cd->bhwd", padded[:, i:i + hh, j:j + ww], kernel[i, j])
            for i in range(3) for j in range(3))
  return out + p[f"{path}/bias"]


def _pixels(p, z):
  e = p[f"{C}/Embed_0/embedding"][z].astype(np.float64)  # [B, H, W, C, F]
  return e.reshape(*z.shape[:3], -1)


def _down(p, z, res_block, n_layers):
  """The input conv and the down ResBlocks of both UNets: (h, skips), the input conv's output
  first."""
  h = _conv3x3(p, f"{U}/Conv_0", _pixels(p, z))
  skips = [h]
  for k in range(n_layers):
    h = res_block(k, h)
    skips.append(h)
  return h, skips


def _to_logits(h, z, vocab):
  return h.reshape(*z.shape, vocab)


def unet_logits(p, z, t, feature_dim, n_layers, vocab=256, labels=None):
  """The released CIFAR-10 UNet: float64[B, H, W, C, vocab]."""
  c = _cond(p, t, feature_dim, labels)

  def res_block(k, x):
    b = f"{U}/ResBlock_{k}"
    h = _conv3x3(p, f"{b}/Conv_0", _swish(_group_norm(x, p[f"{b}/GroupNorm_0/scale"],
                                                      p[f"{b}/GroupNorm_0/bias"])))
    h = h + _lin(p, f"{b}/Dense_0", c)[:, None, None]
    h = _conv3x3(p, f"{b}/Conv_1", _swish(_group_norm(h, p[f"{b}/GroupNorm_1/scale"],
                                                      p[f"{b}/GroupNorm_1/bias"])))
    return (_lin(p, f"{b}/Dense_1", x) if f"{b}/Dense_1/kernel" in p else x) + h

  h, skips = _down(p, z, res_block, n_layers)
  h = res_block(n_layers, h)
  a = f"{U}/SelfAttention_0"
  m = f"{a}/MultiHeadDotProductAttention_0"
  b_, hh, ww, f = h.shape
  x = _group_norm(h, p[f"{a}/GroupNorm_0/scale"], p[f"{a}/GroupNorm_0/bias"]).reshape(b_, -1, f)
  proj = lambda n: np.einsum("blc,cnh->blnh", x, p[f"{m}/{n}/kernel"]) + p[f"{m}/{n}/bias"]
  out = np.einsum("blnh,nhc->blc", _attention(proj("query"), proj("key"), proj("value")),
                  p[f"{m}/out/kernel"]) + p[f"{m}/out/bias"]
  h = h + out.reshape(h.shape)
  h = res_block(n_layers + 1, h)
  for j in range(n_layers + 1):
    h = res_block(n_layers + 2 + j, np.concatenate([h, skips.pop()], axis=-1))
  h = _swish(_group_norm(h, p[f"{U}/GroupNorm_0/scale"], p[f"{U}/GroupNorm_0/bias"]))
  return _to_logits(_conv3x3(p, f"{U}/Conv_1", h), z, vocab)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def uvit_logits(p, z, t, feature_dim, n_layers, dit_layers, hidden, heads, vocab=256):
  """The released ImageNet 64x64 U-ViT (one resolution, DiT on 2x2 patches): [B, H, W, C, V]."""
  c = _cond(p, t, feature_dim)

  def cond_group_norm(path, x):
    scale, shift = np.split(_lin(p, f"{path}/Dense_0", c)[:, None, None], 2, axis=-1)
    return _group_norm(x) * (1 + scale) + shift

  def res_block(k, x):
    b = f"{U}/ResBlock_{k}"
    h = _conv3x3(p, f"{b}/Conv_0", _swish(cond_group_norm(f"{b}/CondGroupNorm_0", x)))
    h = _conv3x3(p, f"{b}/Conv_1", _swish(cond_group_norm(f"{b}/CondGroupNorm_1", h)))
    return (_lin(p, f"{b}/Dense_0", x) if f"{b}/Dense_0/kernel" in p else x) + h

  h, skips = _down(p, z, res_block, n_layers)
  dit = f"{U}/DiT_0"
  b_, hh, ww, f = h.shape
  g = hh // 2
  patches = h.reshape(b_, g, 2, g, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(b_, g * g, 4 * f)
  kernel = p[f"{dit}/x_embedder/proj/kernel"].reshape(4 * f, hidden)  # (kh, kw, cin) flattened.
  x = patches @ kernel + p[f"{dit}/x_embedder/proj/bias"] + p[f"{dit}/pos_embed"]
  split = lambda y: y.reshape(b_, g * g, heads, hidden // heads)
  for i in range(dit_layers):
    blk = f"{dit}/blocks_{i}"
    sa, ca, ga, sm, cm, gm = np.split(_lin(p, f"{blk}/Dense_0", _swish(c))[:, None], 6, axis=-1)
    y = _layer_norm(x, 1e-6) * (1 + ca) + sa
    att = _attention(*(split(_lin(p, f"{blk}/attn/{w}", y)) for w in ("wq", "wk", "wv")))
    x = x + ga * _lin(p, f"{blk}/attn/wo", att.reshape(b_, g * g, hidden))
    y = _layer_norm(x, 1e-6) * (1 + cm) + sm
    x = x + gm * _lin(p, f"{blk}/mlp/fc2", _gelu_tanh(_lin(p, f"{blk}/mlp/fc1", y)))
  shift, scale = np.split(_lin(p, f"{dit}/final_layer/Dense_0", _swish(c))[:, None], 2, axis=-1)
  x = _lin(p, f"{dit}/final_layer/linear", _layer_norm(x, 1e-6) * (1 + scale) + shift)
  h = x.reshape(b_, g, g, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(b_, hh, ww, f)

  for j in range(n_layers + 1):
    h = res_block(n_layers + j, np.concatenate([h, skips.pop()], axis=-1))
  h = _swish(cond_group_norm(f"{U}/CondGroupNorm_0", h))
  return _to_logits(_conv3x3(p, f"{U}/Conv_1", h), z, vocab)
