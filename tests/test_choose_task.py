"""The task-choice rule of bench/choose_task.py: base accuracy in 10-60%, then the longest responses."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from choose_task import choose


def row(task, accuracy, tokens):
    return {"task": task, "accuracy_flexible": accuracy, "mean_tokens": tokens}


def test_the_longest_responses_win_among_tasks_off_the_floor_and_below_the_ceiling():
    rows = [
        row("floor", 2.0, 120.0),
        row("short", 11.0, 7.6),
        row("long", 35.0, 48.0),
        row("easy", 80.0, 90.0),
    ]
    assert choose(rows) == "long"


def test_no_task_inside_the_band_chooses_nothing_rather_than_the_nearest():
    assert choose([row("floor", 7.5, 9.4), row("easy", 61.0, 30.0)]) is None
    assert choose([row("edge", 10.0, 5.0)]) == "edge"
