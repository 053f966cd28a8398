"""The reproduction study (benchmarks/study.py), seconds long: tiny networks, 4 steps, one seed."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_study_trains_each_variant_and_writes_the_report_and_plot(tmp_path):
  out, plot = tmp_path / "STUDY.md", tmp_path / "plot.png"
  args = ["--preset=tiny", "--steps=4", "--eval_every=2", "--seeds=0", "--samples=4",
          f"--workdir={tmp_path}/runs", f"--out={out}", f"--plot={plot}"]
  done = subprocess.run([sys.executable, "benchmarks/study.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  text = out.read_text()
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.splitlines() if line.startswith("| ") and "variant" not in line}
  assert set(rows) == {"MD4, linear", "MD4, cosine", "GenMD4"}
  for cells in rows.values():
    bits, entropy = float(cells[0]), float(cells[2])
    assert 0.0 < bits < 10.0 and 0.0 <= entropy <= 3.0  # 16 characters: entropy <= log 16.
  assert "Lowest mean bound first:" in text and "GenMD4 below MD4" in text
  assert "![eval bits/char against steps](plot.png)" in text
  assert os.path.getsize(plot) > 1000
  # A second study into the same runs would resume them: it is refused instead.
  again = subprocess.run([sys.executable, "benchmarks/study.py", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode != 0 and "exists: remove it" in again.stderr
