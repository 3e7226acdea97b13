"""Installs the stand-in accelerator of ``tests/fakedevice.py`` in a process started by a test
with ``process_env()`` (the variable below set and this folder on PYTHONPATH); does nothing in
any other process."""

import os
import sys

if os.environ.get("DISTILL_TEST_STAND_IN_ACCELERATOR"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.fakedevice import install_in_process

    install_in_process()
