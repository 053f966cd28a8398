"""Document corpora: reading, held-out split, packing, PackedBlocks, offline on a made corpus."""

import gzip
import hashlib
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from md4.data import documents
from md4.data import tokenizers
from array_record.python import array_record_module

SEQ = 32
FRACTION = 0.25
SEED = 3
WORDS = ("the a of and to in is was for on that with as by at from it his an were are which this "
         "be or has had first one their its new after who they have her she two been other when "
         "there all during into school time may years more most only over city some world would "
         "where later up such used many can state about national out known university united "
         "then made").split()


def _make_corpus(n: int) -> list[str]:
  rng = np.random.default_rng(0)
  docs = []
  for i in range(n):
    lines = []
    for _ in range(rng.integers(1, 4)):
      lines.append(" ".join(rng.choice(WORDS, rng.integers(1, 15))))
    docs.append(f"doc {i}: " + "\n".join(lines))  # Unique texts: a document is its text.
  return docs


def _write_jsonl(path, docs, extra=True):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"id": i, "text": d} if extra else {"text": d}) + "\n")


def _write_parquet(path, docs, column="text"):
  table = pa.table({"id": list(range(len(docs))), column: docs})
  pq.write_table(table, path, row_group_size=16)  # Several row groups.


def _write_corpus(root, docs):
  """docs split over a.jsonl, b.jsonl.gz, c.parquet and one .txt per document; returns the
  documents in the order prepare reads them (files sorted by path)."""
  os.makedirs(root / "txt")
  a, b, c, t = docs[:50], docs[50:100], docs[100:170], docs[170:]
  _write_jsonl(root / "a.jsonl", a)
  _write_jsonl(root / "b.jsonl.gz", b)
  _write_parquet(root / "c.parquet", c)
  for i, d in enumerate(t):
    (root / "txt" / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
  return a + b + c + t


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  docs = _make_corpus(200)
  ordered = _write_corpus(root, docs)
  model = tokenizers.train_sentencepiece(docs, str(root / "spm" / "toy"), vocab_size=120)
  data_dir = root / "data"
  meta = documents.prepare_documents(
      "toy", [str(root / "*.jsonl*"), str(root / "c.parquet"), str(root / "txt")], str(data_dir),
      tokenizer=f"sentencepiece:{model}", seq_length=SEQ, heldout_fraction=FRACTION, seed=SEED,
      blocks_per_shard=50, progress=False)
  return dict(root=root, docs=docs, ordered=ordered, model=model, data_dir=str(data_dir),
              meta=meta, tok=tokenizers.get_tokenizer(f"sentencepiece:{model}"))


def _raw_blocks(directory, split, meta):
  blocks = []
  for shard in meta["splits"][split]["shards"]:
    reader = array_record_module.ArrayRecordReader(os.path.join(directory, shard))
    blocks += reader.read_all()
    reader.close()
  dtype = np.dtype(meta["dtype"]).newbyteorder("<")
  return np.frombuffer(b"".join(blocks), dtype).reshape(-1, meta["seq_length"]).astype(np.int64)


def _split_documents(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
  assert stream[-1] == eos
  ends = np.flatnonzero(stream == eos)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [tuple(stream[s:e]) for s, e in zip(starts, ends)]


def test_heldout_rule_is_keyed_blake2b_of_the_text():
  for text in ("", "hello", "doc 7: the city\nof"):
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=(5).to_bytes(8, "little")).digest()
    u = int.from_bytes(digest, "little") / 2**64
    assert documents.heldout_score(text, 5) == u
    assert documents.is_heldout(text, 5, 0.3) == (u < 0.3)
  assert documents.heldout_score("hello", 5) != documents.heldout_score("hello", 6)


def test_every_token_appears_once_in_order_with_one_eos_per_document(corpus):
  meta, tok = corpus["meta"], corpus["tok"]
  directory = os.path.join(corpus["data_dir"], "toy")
  eos = meta["eos_id"]
  assert (meta["vocab_size"], eos, meta["dtype"]) == (120, tok.eos_id, "uint16")
  total_docs = 0
  for split in ("train", "valid"):
    info = meta["splits"][split]
    docs = [d for d in corpus["ordered"]
            if documents.is_heldout(d, SEED, FRACTION) == (split == "valid")]
    expected = np.concatenate([np.asarray(tok.encode(d) + [eos]) for d in docs])
    assert eos not in np.concatenate([tok.encode(d) for d in docs])  # So EOS marks document ends.
    blocks = _raw_blocks(directory, split, meta)
    assert info["blocks"] == len(blocks) == -(-len(expected) // SEQ)
    assert info["tokens"] == len(expected) and info["documents"] == len(docs)
    stream = blocks.reshape(-1)
    np.testing.assert_array_equal(stream[:info["tokens"]], expected)
    assert np.all(stream[info["tokens"]:] == eos)  # Padding only at the very end.
    assert len(_split_documents(stream[:info["tokens"]], eos)) == len(docs)
    assert len(info["shards"]) == -(-info["blocks"] // 50)
    total_docs += len(docs)
  assert total_docs == len(corpus["docs"])
  assert len(meta["splits"]["train"]["shards"]) >= 3  # Several shards were written.
  assert meta["source_files"] == sorted(meta["source_files"])
  assert sorted(os.listdir(corpus["data_dir"])) == ["toy"]  # No temporary directory left.


def test_heldout_split_is_stable_across_file_order_and_disjoint_from_train(corpus, tmp_path):
  docs = corpus["docs"]
  shuffled = [docs[i] for i in np.random.default_rng(1).permutation(len(docs))]
  _write_parquet(tmp_path / "all.parquet", shuffled)
  spec = f"sentencepiece:{corpus['model']}"
  meta2 = documents.prepare_documents("toy2", [str(tmp_path / "all.parquet")], str(tmp_path / "d"),
                                      tokenizer=spec, seq_length=SEQ, heldout_fraction=FRACTION,
                                      seed=SEED, progress=False)

  def split_docs(directory, meta, split):
    stream = _raw_blocks(directory, split, meta).reshape(-1)[:meta["splits"][split]["tokens"]]
    return set(_split_documents(stream, meta["eos_id"]))

  first = os.path.join(corpus["data_dir"], "toy")
  second = str(tmp_path / "d" / "toy2")
  valid1, valid2 = split_docs(first, corpus["meta"], "valid"), split_docs(second, meta2, "valid")
  train1 = split_docs(first, corpus["meta"], "train")
  assert valid1 == valid2
  assert not valid1 & train1
  n = len(docs)
  assert len(valid1) + len(train1) == n
  sd = np.sqrt(n * FRACTION * (1 - FRACTION))
  assert abs(len(valid1) - n * FRACTION) < 4 * sd, (len(valid1), n)


def test_parquet_jsonl_and_txt_give_the_same_documents(tmp_path):
  docs = ["plain", "two\nlines\n", 'quotes " and \\ backslash', "unicode: café ☃ 日本",
          " spaces "]
  _write_parquet(tmp_path / "d.parquet", docs)
  _write_jsonl(tmp_path / "d.jsonl", docs)
  _write_jsonl(tmp_path / "d.jsonl.gz", docs, extra=False)
  os.makedirs(tmp_path / "txt")
  for i, d in enumerate(docs):
    (tmp_path / "txt" / f"{i}.txt").write_text(d, encoding="utf-8")
  for inputs in ([tmp_path / "d.parquet"], [tmp_path / "d.jsonl"], [tmp_path / "d.jsonl.gz"],
                 [tmp_path / "txt"], [tmp_path / "txt" / "*.txt"]):
    files = documents.list_files([str(p) for p in inputs])
    assert list(documents.read_documents(files)) == docs, inputs


def test_empty_documents_are_skipped_and_counted(corpus, tmp_path):
  _write_jsonl(tmp_path / "e.jsonl", ["", "the city", ""])
  meta = documents.prepare_documents("e", [str(tmp_path / "e.jsonl")], str(tmp_path / "d"),
                                     tokenizer=f"sentencepiece:{corpus['model']}", seq_length=SEQ,
                                     heldout_fraction=0.0, progress=False)
  assert meta["empty_documents_skipped"] == 2
  assert meta["splits"]["train"]["documents"] == 1
  assert meta["splits"]["valid"] == {"documents": 0, "tokens": 0, "blocks": 0, "shards": []}


@pytest.fixture(scope="module")
def blocks(corpus):
  ds = documents.PackedBlocks(corpus["data_dir"], "toy", SEQ)
  directory = os.path.join(corpus["data_dir"], "toy")
  return ds, {s: _raw_blocks(directory, s, corpus["meta"]) for s in ("train", "valid")}


def test_packed_blocks_spec_and_training_rows_are_the_blocks_they_name(blocks, corpus):
  ds, raw = blocks
  assert ds.spec.vocab_size == 120 and ds.spec.example_shape == (SEQ,)
  assert (ds.spec.kind, ds.spec.unit) == ("text", "token")
  assert ds.name == "toy" and ds.num_train_records() == len(raw["train"])
  batch = next(ds.train_iterator(12, seed=7))
  assert batch["x"].dtype == np.int32 and batch["x"].shape == (12, SEQ)
  np.testing.assert_array_equal(batch["x"], raw["train"][batch["source_index"]])
  text = ds.decode(raw["valid"][0])
  assert isinstance(text, str) and "doc" in text
  bits, what = ds.baseline()
  assert 0 < bits < np.log2(120) and what


def test_stream_is_deterministic_in_seed_and_survives_pickling(blocks, corpus):
  ds, _ = blocks
  a = next(ds.train_iterator(8, seed=1))
  np.testing.assert_array_equal(a["x"], next(ds.train_iterator(8, seed=1))["x"])
  fresh = pickle.loads(pickle.dumps(documents.PackedBlocks(corpus["data_dir"], "toy", SEQ)))
  np.testing.assert_array_equal(a["x"], next(fresh.train_iterator(8, seed=1))["x"])
  assert not np.array_equal(a["source_index"], next(ds.train_iterator(8, seed=2))["source_index"])


def test_each_block_is_seen_once_per_epoch(blocks):
  ds, raw = blocks
  n = len(raw["train"])
  it = ds.train_iterator(1, seed=4)
  epochs = [np.array([next(it)["source_index"][0] for _ in range(n)]) for _ in range(3)]
  for b in epochs:
    np.testing.assert_array_equal(np.sort(b), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])


def test_two_processes_draw_disjoint_blocks_within_an_epoch(blocks):
  ds, raw = blocks
  n, global_batch = len(raw["train"]), 8
  steps = n // global_batch
  single = ds.train_iterator(global_batch, seed=9)
  iters = [ds.train_iterator(global_batch, seed=9, process_index=p, process_count=2)
           for p in range(2)]
  seen = [set(), set()]
  for _ in range(steps):
    expected = next(single)
    local = [next(it) for it in iters]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in local]), expected["x"])
    for p, b in enumerate(local):
      np.testing.assert_array_equal(b["x"], raw["train"][b["source_index"]])
      seen[p] |= set(b["source_index"].tolist())
  assert len(seen[0]) == len(seen[1]) == steps * 4
  assert not seen[0] & seen[1]


def test_describe_example_names_the_shard_record_and_tokens(blocks, corpus):
  ds, raw = blocks
  meta = corpus["meta"]["splits"]["train"]
  directory = os.path.abspath(os.path.join(corpus["data_dir"], "toy"))
  block = len(raw["train"]) - 1  # The last block, in the last shard.
  shard = os.path.join(directory, meta["shards"][-1])
  assert len(meta["shards"]) > 1  # The fixture writes 50 blocks per shard.
  before = 50 * (len(meta["shards"]) - 1)
  assert ds.describe_example("train", block) == (
      f"toy train block {block} ({shard}, record {block - before}; tokens "
      f"[{block * SEQ}, {(block + 1) * SEQ}) of the train split)")
  assert ds.describe_example("test", 0).startswith("toy valid block 0 (")


def test_eval_scores_every_real_valid_token_once_in_order(blocks, corpus):
  ds, raw = blocks
  tokens = corpus["meta"]["splits"]["valid"]["tokens"]
  assert tokens % SEQ  # The corpus leaves a padded last block, so the tail is exercised.
  assert ds.num_eval_examples("valid") == ds.num_eval_examples("test") == tokens // SEQ
  full = ds.eval_example("valid", np.arange(ds.num_eval_examples("valid")))["x"]
  tail = ds.eval_tail("valid")["x"]
  assert tail.shape == (1, tokens % SEQ) and tail.dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([full.reshape(-1), tail[0]]),
                                raw["valid"].reshape(-1)[:tokens])
  for split in ("valid", "test"):
    batches = list(ds.eval_iterator(split, global_batch=8))
    got = [b["x"][b["weight"] > 0].reshape(-1) for b in batches]
    np.testing.assert_array_equal(np.concatenate(got), raw["valid"].reshape(-1)[:tokens])
  with pytest.raises(ValueError, match="unknown evaluation split 'train'"):
    ds.num_eval_examples("train")


def test_unprepared_dataset_names_the_prepare_command(tmp_path):
  with pytest.raises(ValueError, match=r"dataset owt is not prepared in .*md4 prepare owt "
                                       r"--data_dir=.* --source=FILES"):
    documents.PackedBlocks(str(tmp_path), "owt", SEQ)


def test_wrong_seq_length_names_both(corpus):
  with pytest.raises(ValueError, match=r"seq_length 32.*seq_length 64"):
    documents.PackedBlocks(corpus["data_dir"], "toy", 64)


def test_bad_inputs_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="no files matched the pattern .*nothing-\\*.jsonl"):
    documents.list_files([str(tmp_path / "nothing-*.jsonl")])
  _write_parquet(tmp_path / "body.parquet", ["a", "b"], column="body")
  with pytest.raises(ValueError, match="body.parquet: a parquet file without a 'text' column"):
    list(documents.read_documents([str(tmp_path / "body.parquet")]))
  with open(tmp_path / "bad.jsonl", "w") as f:
    f.write('{"text": "ok"}\n\n{"content": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: a jsonl line without a 'text' field"):
    list(documents.read_documents([str(tmp_path / "bad.jsonl")]))
  (tmp_path / "x.csv").write_text("text\n")
  with pytest.raises(ValueError, match="unsupported input file"):
    documents.list_files([str(tmp_path / "x.csv")])


def test_a_failed_prepare_leaves_nothing_that_looks_prepared(corpus, tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", corpus["docs"][:20])
  with open(tmp_path / "b.jsonl", "w") as f:
    f.write('{"title": "no text"}\n')
  data_dir = tmp_path / "data"
  with pytest.raises(ValueError, match="b.jsonl:1"):
    documents.prepare_documents("t", [str(tmp_path / "*.jsonl")], str(data_dir),
                                tokenizer=f"sentencepiece:{corpus['model']}", seq_length=SEQ,
                                progress=False)
  assert os.listdir(data_dir) == []


def test_preparing_again_replaces_the_dataset(corpus, tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", corpus["docs"][:20])
  kw = dict(tokenizer=f"sentencepiece:{corpus['model']}", heldout_fraction=0.2, progress=False)
  for seq_length in (16, 8):
    documents.prepare_documents("t", [str(tmp_path / "a.jsonl")], str(tmp_path / "d"),
                                seq_length=seq_length, **kw)
  assert os.listdir(tmp_path / "d") == ["t"]
  assert documents.PackedBlocks(str(tmp_path / "d"), "t", 8).num_train_blocks > 0


def test_unknown_tokenizer_lists_valid_forms():
  with pytest.raises(ValueError, match=r"unknown tokenizer 'bpe'; valid forms: \"gpt2\", "
                                       r"\"bpe:DIR\" .*, \"sentencepiece:PATH\""):
    tokenizers.get_tokenizer("bpe")


def test_tokenizers_pickle_as_their_spec(corpus):
  for spec in ("gpt2", f"sentencepiece:{corpus['model']}"):
    tok = pickle.loads(pickle.dumps(tokenizers.get_tokenizer(spec)))
    assert tok.name == spec
  assert (tokenizers.get_tokenizer("gpt2").vocab_size, tokenizers.get_tokenizer("gpt2").eos_id) == (
      50257, 50256)


def test_gpt2_without_its_bpe_file_or_network_says_how_to_provide_it(tmp_path, monkeypatch):
  tiktoken_load = pytest.importorskip("tiktoken.load")
  registry = pytest.importorskip("tiktoken.registry")
  if not hasattr(tiktoken_load, "read_file") or not hasattr(registry, "ENCODINGS"):
    pytest.skip("this tiktoken fetches its files differently; cannot block the network reliably")
  import socket  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise ConnectionError("network blocked by the test")

  monkeypatch.setattr(tiktoken_load, "read_file", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(registry, "ENCODINGS", {})
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
  tokenizers._gpt2_encoding.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(RuntimeError,
                     match=r"GPT-2 BPE file could not be fetched.*TIKTOKEN_CACHE_DIR"):
    tokenizers.get_tokenizer("gpt2").encode("hello")
  tokenizers._gpt2_encoding.cache_clear()  # pylint: disable=protected-access
