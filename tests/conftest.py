"""Test set-up: four fake CPU devices, so the data-parallel step runs as on a multi-chip host.

The flag must be set before JAX initialises its backends, hence at import time of conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
