"""`make bench`: every benchmark in turn; paste the tables into docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

scripts = ["bench_backbones.py", "bench_int8.py", "bench_infer.py"]
if importlib.util.find_spec("ray") is not None:  # the distributed extra
    scripts.append("bench_ray.py")
else:
    print('bench_ray.py skipped: pip install -e ".[distributed]" to compare Ray with local inference')
for script in scripts:
    print(f"\n## {script}\n", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True, cwd=HERE.parent)
