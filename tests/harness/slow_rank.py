"""Test-only launcher of `axolotl-upft sample` (run by torchrun in its place) in which one rank is late with
its first part file.

UPFT_TEST_SLOW_RANK names the rank. With UPFT_TEST_SLOW_SECONDS it sleeps that long first (alive: its
heartbeat goes on). With UPFT_TEST_FREEZE_PID_FILE it writes its pid there and stops itself (SIGSTOP), as
a lost node would: no exit for torchrun to see and no heartbeat; the test kills it by that pid.
"""

import os
import signal
import sys
import time
from pathlib import Path

from axolotl_upft.cache import SampleCache
from axolotl_upft.cli import main

write_part = SampleCache.write_part
first = {"late": os.environ["RANK"] == os.environ["UPFT_TEST_SLOW_RANK"]}


def late_write_part(self, records):
    if first.pop("late", False):
        if "UPFT_TEST_FREEZE_PID_FILE" in os.environ:
            Path(os.environ["UPFT_TEST_FREEZE_PID_FILE"]).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(float(os.environ.get("UPFT_TEST_SLOW_SECONDS", "0")))
    return write_part(self, records)


SampleCache.write_part = late_write_part
main(["sample", *sys.argv[1:]])
