"""`make bench`: every benchmark in turn; paste the tables into docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("bench_backbones.py", "bench_int8.py", "bench_infer.py"):
    print(f"\n## {script}\n", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True, cwd=HERE.parent)
