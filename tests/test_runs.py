"""What --resume compares: Run.create against the run's config.json."""

import json

import pytest

from audiofx.errors import ConfigError
from audiofx.training.stages.runs import Run, recorded_config


def test_resume_compares_the_data_mode_not_the_budget_that_chose_it(tmp_path):
    config = {"epochs": 3, "lr": 0.1, "data_mode": "streaming", "memory_budget_gb": 0.0}
    Run.create(tmp_path, "finetune", "r", config)
    assert recorded_config(tmp_path, "finetune", "r", resume=False) is None  # a new run reads nothing
    assert recorded_config(tmp_path, "finetune", "r", resume=True)["data_mode"] == "streaming"
    # another budget that streams too: the batches are the same, so the run resumes
    Run.create(tmp_path, "finetune", "r", {**config, "memory_budget_gb": 0.5}, resume=True)
    assert json.loads((tmp_path / "finetune" / "r" / "config.json").read_text())["memory_budget_gb"] == 0.0
    with pytest.raises(ConfigError, match=r"other settings \(data_mode streaming, now memory\)"):
        Run.create(tmp_path, "finetune", "r", {**config, "data_mode": "memory", "memory_budget_gb": 9}, resume=True)
    with pytest.raises(ConfigError, match=r"other settings \(lr 0.1, now 0.2\)"):
        Run.create(tmp_path, "finetune", "r", {**config, "lr": 0.2}, resume=True)


def test_a_setting_added_later_resumes_an_older_run_only_at_the_value_it_behaved_as(tmp_path):
    Run.create(tmp_path, "pretrain", "old", {"epochs": 3})  # recorded before data_mode existed
    later = {"data_mode": "memory"}
    Run.create(tmp_path, "pretrain", "old", {"epochs": 3, "data_mode": "memory"}, resume=True, later=later)
    assert "data_mode" not in json.loads((tmp_path / "pretrain" / "old" / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"other settings \(data_mode memory, now streaming\)"):
        Run.create(tmp_path, "pretrain", "old", {"epochs": 3, "data_mode": "streaming"}, resume=True, later=later)
    # without `later`, a new key differs
    with pytest.raises(ConfigError, match=r"other settings \(data_mode default, now memory\)"):
        Run.create(tmp_path, "pretrain", "old", {"epochs": 3, "data_mode": "memory"}, resume=True)
