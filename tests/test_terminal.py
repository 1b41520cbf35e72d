"""kd as a person runs it: the installed console script in a pseudo-terminal, live display included.

The in-process tests capture kd's output (no terminal: Rich draws no progress bar there); these run
the same commands where Rich does draw it, and check the run completes, writes its files and that the
display really moved. A last test checks the opposite case: output to a pipe is never wrapped.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import TINY_DATA
from tests.terminal import run_in_terminal

# 128 training images in 32 steps of 4: the trainer reads the loss at step 20 (its log interval) and
# at step 32, and the display redraws at each, so frames "20/32" and "32/32" must both appear.
TERMINAL_RUN = ["--data", TINY_DATA, "--epochs", "2", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture
def stored_teacher(kd, tmp_path):
    """A resnet8 for TINY_DATA in the test's teacher store, so `--teacher resnet8` finds it by name."""
    assert kd("train", "resnet8", "--data", TINY_DATA, "--epochs", "1", "--device", "cpu", "--out", tmp_path / "t").code == 0


def assert_live_progress(screen, epochs: int = 2, steps: int = 32) -> None:
    text = screen.text
    assert "Traceback" not in text and "error:" not in text, text[-3000:]
    for epoch in range(1, epochs + 1):
        frame = rf"epoch {epoch}/{epochs} .*\b20/{steps} loss \d+\.\d{{4}} \d+ img/s \d:\d\d:\d\d"
        assert re.search(frame, text), (frame, text[-3000:])  # the bar moved mid-epoch, loss and speed filled in
        assert re.search(rf"^epoch +{epoch}/{epochs} +lr ", text, re.M), text[-3000:]  # the epoch's line


def test_train_in_a_terminal_draws_live_progress_and_writes_the_model(tmp_path):
    out = tmp_path / "teacher"
    screen = run_in_terminal("train", "resnet8", *TERMINAL_RUN, "--out", out)
    assert screen.code == 0, screen.text[-3000:]
    assert_live_progress(screen)
    assert "wall time" in screen.text and "time / epoch, median (s)" in screen.text  # the summary table
    assert (out / "model.safetensors").is_file() and json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_distill_and_eval_in_a_terminal(stored_teacher, tmp_path):
    out = tmp_path / "kd"
    screen = run_in_terminal("distill", "--teacher", "resnet8", "--student", "resnet8", "--method", "kd",
                             *TERMINAL_RUN, "--out", out)
    assert screen.code == 0, screen.text[-3000:]
    assert_live_progress(screen)
    assert "teacher agreement (%)" in screen.text
    assert (out / "student.safetensors").is_file() and (out / "summary.json").is_file()

    screen = run_in_terminal("eval", out / "student.safetensors", "--batch-size", "64")
    assert screen.code == 0, screen.text[-3000:]
    assert re.search(r"top-1 \(%\) +│ \d+\.\d\d", screen.text), screen.text
    assert re.search(r"latency, batch 1 \(ms\) +│ \d+\.\d\d \(IQR", screen.text), screen.text


def test_compare_in_a_terminal(stored_teacher, tmp_path):
    out = tmp_path / "cmp"
    screen = run_in_terminal("compare", "--teacher", "resnet8", "--student", "resnet8", "--methods", "none,kd",
                             *TERMINAL_RUN, "--out", out)
    assert screen.code == 0, screen.text[-3000:]
    assert_live_progress(screen)
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert sorted(row["method"] for row in rows) == ["kd", "none"]
    assert (out / "compare.md").is_file() and (out / "compare.csv").is_file()


def test_output_to_a_pipe_is_never_wrapped(kd, tmp_path):
    out = tmp_path / ("a-long-folder-name-" * 5) / "run-with-a-long-name"
    result = kd("train", "resnet8", "--data", TINY_DATA, "--epochs", "1", "--device", "cpu", "--out", out)
    assert result.code == 0, result.stderr
    assert f"{out}/model.safetensors" in result.stdout  # the whole path on one line, however long
    assert re.search(r"^train resnet8: 1 epoch x \d+ steps$", result.stderr, re.M), result.stderr
    assert all(len(line) <= 2000 for line in result.stdout.splitlines())
