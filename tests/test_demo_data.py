"""Tests of the embedded demo data, its generators' recorded results, and the text8 vocab."""

import hashlib
import importlib.util
import lzma
import pathlib
import re

import numpy as np
import pytest

from md4.data import demo, text8

_DEMO_DIR = pathlib.Path(__file__).resolve().parents[1] / "md4" / "data" / "demo"


def _load_script(name):
  """Imports a generator script by path (md4/data/demo/ is a data folder, not a package)."""
  spec = importlib.util.spec_from_file_location(name, _DEMO_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def corpus_text():
  return lzma.decompress((_DEMO_DIR / demo.SHAKESPEARE_FILE).read_bytes()).decode("ascii")


# --- text8 vocabulary --------------------------------------------------------------------


def test_vocab_is_letters_then_space():
  assert text8.VOCAB_SIZE == 27 == len(set(text8.VOCAB))
  assert text8.VOCAB[:26] == "".join(chr(ord("a") + i) for i in range(26))
  assert text8.VOCAB[26] == " "
  assert text8.MASK_ID == 27


def test_encode_maps_letters_to_their_alphabet_index_and_space_to_26():
  ids = text8.encode("abz y")
  assert ids.dtype == np.uint8
  np.testing.assert_array_equal(ids, [0, 1, 25, 26, 24])


def test_encode_decode_round_trip():
  text = "to be or not to be that is the question"
  assert text8.decode(text8.encode(text)) == text
  assert text8.decode(text8.encode("")) == ""
  all_ids = np.arange(27)
  np.testing.assert_array_equal(text8.encode(text8.decode(all_ids)), all_ids)


@pytest.mark.parametrize(
    "text, char, pos",
    [("abC", "C", 2), ("hello, world", ",", 5), ("caf\u00e9 ok", "\u00e9", 3), ("a\nb", "\n", 1)],
)
def test_encode_error_names_first_bad_character_and_position(text, char, pos):
  with pytest.raises(ValueError, match=re.escape(f"character {char!r} at position {pos} ")):
    text8.encode(text)


def test_decode_renders_mask_id_only_when_mask_char_given():
  ids = np.array([7, 27, 11, 27, 26], dtype=np.int32)
  assert text8.decode(ids, mask_char="_") == "h_l_ "
  with pytest.raises(ValueError, match="id 27 at position 1 "):
    text8.decode(ids)


@pytest.mark.parametrize(
    "ids, kwargs, match",
    [
        ([0, 28], {"mask_char": "_"}, "id 28 at position 1 "),
        ([3, -1], {}, "id -1 at position 1 "),
        ([[0, 1]], {}, r"shape \[L\]"),
        ([0.0, 1.0], {}, "integer ids"),
        ([0], {"mask_char": "__"}, "single character"),
    ],
)
def test_decode_rejects_bad_input(ids, kwargs, match):
  with pytest.raises(ValueError, match=match):
    text8.decode(np.array(ids), **kwargs)


def test_split_ids_is_90_5_5_and_contiguous():
  ids = np.arange(1000) % 27
  splits = text8.split_ids(ids)
  assert [len(s) for s in splits] == [900, 50, 50]
  np.testing.assert_array_equal(np.concatenate(splits), ids)
  with pytest.raises(ValueError, match="N >= 20"):
    text8.split_ids(np.zeros(19, np.uint8))


# --- Shakespeare corpus ------------------------------------------------------------------


def test_corpus_uses_exactly_the_27_symbols(corpus_text):
  assert set(corpus_text) == set(text8.VOCAB)


def test_corpus_has_no_double_spaces_and_no_space_at_the_ends(corpus_text):
  assert "  " not in corpus_text
  assert corpus_text[0] != " " and corpus_text[-1] != " "


def test_corpus_matches_count_and_sha256_recorded_by_generator(corpus_text):
  num_chars, sha256 = _load_script("make_shakespeare").recorded_result()
  assert len(corpus_text) == num_chars
  assert hashlib.sha256(corpus_text.encode("ascii")).hexdigest() == sha256


def test_corpus_has_no_gutenberg_boilerplate(corpus_text):
  words = set(corpus_text.split(" "))
  assert not words & {"gutenberg", "etext", "etexts", "ebook", "copyright"}
  assert "small print" not in corpus_text


def test_load_shakespeare_splits_are_90_5_5_of_the_corpus(corpus_text):
  splits = demo.load_shakespeare()
  n = len(corpus_text)
  sizes = [len(s) for s in splits]
  assert sum(sizes) == n
  for size, fraction in zip(sizes, (0.90, 0.05, 0.05)):
    assert abs(size - fraction * n) <= 2
  for split in splits:
    assert split.dtype == np.uint8 and split.ndim == 1
  whole = np.concatenate(splits)
  np.testing.assert_array_equal(whole, text8.encode(corpus_text))
  assert whole.max() == 26


def test_load_shakespeare_is_cached_and_read_only():
  first, second = demo.load_shakespeare(), demo.load_shakespeare()
  assert np.shares_memory(first.train, second.train)
  with pytest.raises(ValueError, match="read-only"):
    first.train[0] = 0


def test_generator_text8_conversion_and_boilerplate_stripping():
  make = _load_script("make_shakespeare")
  assert make.to_text8("  HAMLET.\nTo be, or not to be--that's 2B?  ") == "hamlet to be or not to be that s b"
  raw = (
      "The Project Gutenberg Etext of Hamlet\nlicence text\n"
      "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
      "HAMLET\nTo be.\nEnd of Project Gutenberg Etext of Hamlet\n"
  )
  assert make.strip_gutenberg(raw).split() == ["HAMLET", "To", "be."]
  modern = "x\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nplay\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\ny"
  assert make.strip_gutenberg(modern).split() == ["play"]
  with pytest.raises(ValueError, match="boilerplate"):
    make.strip_gutenberg("Produced by Project Gutenberg volunteers\nplay")


# --- unigram entropy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, bits",
    [
        ([0, 1, 2, 3], 2.0),  # uniform over 4 symbols
        ([[3, 2], [1, 0]], 2.0),  # shape does not matter
        ([0, 0, 1, 2], 1.5),  # p = 1/2, 1/4, 1/4
        ([5, 9, 5, 9], 1.0),  # unused ids do not count
        ([7, 7, 7], 0.0),
    ],
)
def test_unigram_entropy_of_hand_made_arrays(ids, bits):
  assert demo.unigram_entropy_bits(np.array(ids, dtype=np.uint8)) == pytest.approx(bits, abs=1e-12)


def test_unigram_entropy_equals_direct_numpy_computation():
  ids = np.random.default_rng(0).integers(0, 27, size=1000)
  _, counts = np.unique(ids, return_counts=True)
  p = counts / counts.sum()
  assert demo.unigram_entropy_bits(ids) == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-12)


@pytest.mark.parametrize(
    "ids, match",
    [(np.array([], np.uint8), "empty"), (np.array([0.5]), "integer"), (np.array([1, -2]), ">= 0")],
)
def test_unigram_entropy_rejects_bad_ids(ids, match):
  with pytest.raises(ValueError, match=match):
    demo.unigram_entropy_bits(ids)


def test_corpus_unigram_entropy_is_that_of_english():
  # English text8 is ~4.1 bits/char; log2(27) = 4.75 would mean no letter statistics.
  assert 3.5 < demo.unigram_entropy_bits(demo.load_shakespeare().train) < 4.5


# --- MNIST -------------------------------------------------------------------------------


def test_mnist_shapes_dtypes_and_pixel_range():
  images, labels = demo.load_mnist()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (5000,) and labels.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  # Digits are mostly background: real MNIST has ~19% non-zero pixels.
  assert 0.1 < np.mean(images > 0) < 0.3


def test_mnist_has_every_class_500_times_interleaved():
  _, labels = demo.load_mnist()
  assert labels.max() <= 9
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
  np.testing.assert_array_equal(labels, np.tile(np.arange(10), 500))


def test_mnist_matches_hashes_recorded_by_generator():
  images, labels = demo.load_mnist()
  recorded = _load_script("make_mnist").recorded_result()
  assert (hashlib.sha256(images.tobytes()).hexdigest(),
          hashlib.sha256(labels.tobytes()).hexdigest()) == recorded


def test_mnist_splits_are_fixed_balanced_and_cover_the_data():
  images, labels = demo.load_mnist()
  train, test = demo.load_mnist_splits()
  assert len(train.labels) == 4500 and len(test.labels) == demo.MNIST_NUM_TEST == 500
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 50))
  np.testing.assert_array_equal(np.concatenate([train.images, test.images]), images)
  np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), labels)
  assert train.images.shape[1:] == test.images.shape[1:] == (28, 28)


@pytest.mark.parametrize("num_test", [0, 5, 5000, 15, -10])
def test_mnist_splits_reject_bad_num_test(num_test):
  with pytest.raises(ValueError, match="multiple of 10"):
    demo.load_mnist_splits(num_test)
