"""The one logger: info on stdout as the bare message, warnings and errors on stderr with their prefix, rank 0 only."""

import pytest

from titan_aquila.errors import UserError, exit_on_user_error
from titan_aquila.logging import logger


def test_streams_prefixes_and_rank_filter(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    logger.info("step     1  loss 9.0000")
    logger.warning("slow")
    logger.error("bad")
    out, err = capsys.readouterr()
    assert out == "step     1  loss 9.0000\n" and err == "warning: slow\nerror: bad\n"
    monkeypatch.setenv("RANK", "1")  # every rank runs the same code: only rank 0 prints
    logger.info("again")
    logger.error("again")
    assert capsys.readouterr() == ("", "")


def test_user_error_is_one_error_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e, exit_on_user_error():
        raise UserError("training.steps must be >= 1, got 0")
    assert e.value.code == 2
    assert capsys.readouterr() == ("", "error: training.steps must be >= 1, got 0\n")
