"""Environment for Flower and Ray in every OncoFed launcher; import before Flower.

A privacy framework does not phone home: Flower's telemetry and update check and Ray's usage
statistics are off unless the user set them explicitly.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU nodes: keep Ray quiet
