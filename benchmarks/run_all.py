"""`make bench`: every benchmark in turn; paste the tables into docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# runtime and deployment first (minutes), then the training-side benchmarks (tens of minutes
# each on 2 cores; they need Debian's dataset-fashion-mnist)
scripts = ["bench_backbones.py", "bench_int8.py", "bench_infer.py", "bench_calibration.py"]
if importlib.util.find_spec("ray") is not None:  # the distributed extra
    scripts.append("bench_ray.py")
else:
    print('bench_ray.py skipped: pip install -e ".[distributed]" to compare Ray with local inference')
if importlib.util.find_spec("uvicorn") is None:  # the serve extra
    print('bench_serve.py skipped: pip install -e ".[serve]" to load-test transfer serve')
elif shutil.which("wrk") is None or len(os.sched_getaffinity(0)) < 2:  # its load generator, on its own core
    print("bench_serve.py skipped: it needs wrk (apt-get install wrk) and 2 cores")
else:
    scripts.append("bench_serve.py")
scripts += ["bench_fit.py", "bench_sweep.py", "bench_heads_bar.py", "bench_audit.py", "bench_faithfulness.py", "bench_road.py"]
for script in scripts:
    print(f"\n## {script}\n", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True, cwd=HERE.parent)
