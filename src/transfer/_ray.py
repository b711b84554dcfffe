"""Starting or joining Ray quietly (shared by Ray sweeps and Ray Data inference).

Ray and Ray Data log start-up, token-auth, execution-plan and progress lines at INFO /
WARNING level; a user of ``transfer`` sees our own
progress lines instead. ``TRANSFER_DEBUG=1`` (``transfer --debug``) keeps all of Ray's
output.
"""

from __future__ import annotations

import logging
import os

from ._lazy import require


def init_ray(address: str | None, *, purpose: str, log_to_driver: bool = False,
             object_store_mb: int = 256):
    """Join the cluster at ``address``, or start a local Ray, unless one is running.

    Returns:
        the ``ray`` module.

    Raises:
        DependencyMissingError: Ray is not installed (names the ``distributed`` extra).

    Example::

        ray = init_ray(None, purpose="--ray")
    """
    debug = os.environ.get("TRANSFER_DEBUG") == "1"
    ray = require("ray", purpose=purpose)
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=log_to_driver,
                  logging_level="INFO" if debug else "ERROR")
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(object_store_memory=object_store_mb * 1024 * 1024, **kw)
    if not debug:
        try:  # ray.data sets up its own logger when imported: quiet it afterwards
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        except ImportError:  # ray without the data extra
            pass
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray
