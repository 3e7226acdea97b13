"""The distill command line: one module per command group."""

import os

# MPS does not implement every operation torch has (which ones depends on the torch and macOS
# versions): with this set, torch runs a missing one on the CPU with a warning instead of
# failing the job. torch reads it once, when it loads, so it is set here, before any command
# (a worker's too) imports torch; it does nothing on other devices, and a value the user set is
# kept.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
