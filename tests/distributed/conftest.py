"""One local Ray instance (2 CPUs) per test module that asks for it, shut down after the module
(its daemons would otherwise keep polling beside the rest of the session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason='Ray is optional: pip install "transfer[distributed]"')
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
                 logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
