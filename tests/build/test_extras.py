"""Long stages log their progress when stderr is not a terminal (as under pytest, systemd,
CI, `| tee`), about every tenth of the way and at the end."""

from __future__ import annotations

import logging

import pytest

from edge_build.extras import LogProgress


def test_progress_is_logged_every_tenth_when_not_a_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bar = LogProgress("demo train", 95)
    assert bar.on  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="edge_build.progress"):
        for step in range(1, 96):
            bar.update(step, f"loss {1 / step:.3f}")
    lines = [r.getMessage() for r in caplog.records]
    assert 9 <= len(lines) <= 11, lines
    assert lines[0].startswith("demo train 1/95") and lines[-1].startswith("demo train 95/95")
