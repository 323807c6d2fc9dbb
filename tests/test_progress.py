"""Progress where the output is a file (issue 16): throttled log lines with done/total, rate and ETA."""

from __future__ import annotations

import logging
import re

import pytest

from resofilter import progress
from resofilter.errors import ConfigError
from tests.helpers.common import ft_overrides


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throttled_lines_by_hand(caplog):
    clock = Clock()
    t = progress.Throttled("scoring", total=10, unit="batches", every_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="resofilter.progress"):
        for i in range(1, 11):
            clock.t += 10  # 10 s a batch: a line at 30 s, 60 s, 90 s and at the end (100 s)
            t.update(i)
        t.close()  # the end was logged already: nothing more
    lines = [r.getMessage() for r in caplog.records if r.name == "resofilter.progress"]
    assert lines == ["scoring: 3/10 batches (30%), 0.10 batches/s, elapsed 30s, ETA 1m10s",
                     "scoring: 6/10 batches (60%), 0.10 batches/s, elapsed 1m00s, ETA 40s",
                     "scoring: 9/10 batches (90%), 0.10 batches/s, elapsed 1m30s, ETA 10s",
                     "scoring: 10/10 batches (100%), 0.10 batches/s, elapsed 1m40s, ETA 0s"]


def test_bad_progress_settings_are_config_errors():
    with pytest.raises(ConfigError, match="progress.bars"):
        progress.configure(bars="sometimes")
    with pytest.raises(ConfigError, match="progress.log_every_s"):
        progress.configure(log_every_s=-1)


def test_a_finetune_logs_progress_lines_when_not_in_a_terminal(tmp_path, tiny_model_dir, caplog, monkeypatch):
    from resofilter.commands import finetune
    from tests.conftest import compose_cfg

    monkeypatch.setitem(progress._SETTINGS, "bars", "auto")  # pytest's stderr is not a terminal
    monkeypatch.setitem(progress._SETTINGS, "log_every_s", 0.0)
    with caplog.at_level(logging.INFO, logger="resofilter.progress"):
        finetune(compose_cfg(ft_overrides(tiny_model_dir, tmp_path / "ft", "finetune.max_steps=3",
                                          "trainer.enable_progress_bar=true"), "finetune"))
    lines = [r.getMessage() for r in caplog.records if r.name == "resofilter.progress"]
    assert [re.search(r": (\d+/\d+ steps)", line).group(1) for line in lines] == ["1/3 steps", "2/3 steps",
                                                                                 "3/3 steps"], lines
    assert lines[0].startswith("fine-tuning (loss ") and "ETA" in lines[0]


def test_lightning_tips_and_banner_stay_out_of_the_log(caplog):
    import warnings

    from resofilter.cli import quiet_third_party

    quiet_third_party()
    rz = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rz.info("💡 Tip: For seamless cloud logging … try installing [litlogger]")
        rz.info("GPU available: False, used: False")
        rz.info("`Trainer.fit` stopped: `max_steps=3` reached.")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=3` reached."]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()  # its filter goes in front again
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use …", DeprecationWarning, stacklevel=1)
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
