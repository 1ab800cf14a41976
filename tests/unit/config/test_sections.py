"""Sections are declared once and flow whole: into workers, the plan hash and the manifest."""

from __future__ import annotations

import pytest

from raydistill.config import CaptureConfig, ConfigError, RunSettings, SweepConfig, TargetsConfig, TrainConfig
from raydistill.contracts.shards.codec import Codec
from raydistill.contracts.shards.manifest import SparsifyInfo, sparsify_info_for
from raydistill.contracts.shards.vocab import VocabTable
from raydistill.stages.capture.run import capture_settings
from raydistill.stages.capture.worker import TeacherSettings

IDS = {"config_sha256": "c" * 64, "weights_sha256": "w" * 64}


def test_every_target_setting_is_recorded_in_the_manifest():
    assert set(TargetsConfig.model_fields) <= set(SparsifyInfo.model_fields)


@pytest.mark.parametrize("mode", ["budget", "topk", "adaptive", "sampled"])
def test_manifest_sparsify_is_the_target_section_as_recorded(mode):
    cfg = CaptureConfig(teacher="t", output="o", mode=mode, k=8, draws=12, threshold=0.5, min_prob=0.01, seed=3)
    codec = Codec.for_mode(mode, k=cfg.k, draws=cfg.draws, vocab_size=100, table=VocabTable.uniform(100))
    info = sparsify_info_for(codec, **cfg.targets.recorded())
    recorded = cfg.targets.recorded()
    assert {k: getattr(info, k) for k in recorded} == recorded  # every value as the plan hash saw it


@pytest.mark.parametrize(("field", "value"), [("k", 32), ("temperature", 2.0), ("value_scale", 100),
                                              ("tail_model", "uniform"), ("tail_prior_exponent", 0.5),
                                              ("mean_ids", 10.0), ("mode", "topk")])
def test_each_target_setting_changes_the_plan_hash(field, value):
    base = CaptureConfig(teacher="t", output="o", mode="budget")  # the mode that reads k and mean_ids
    changed = base.model_copy(update={field: value})
    assert capture_settings(changed, IDS, "s") != capture_settings(base, IDS, "s")


@pytest.mark.parametrize(("field", "value"), [("draws", 64), ("seed", 1), ("temperature", 2.0), ("mode", "budget")])
def test_each_setting_of_the_default_mode_changes_the_plan_hash(field, value):
    base = CaptureConfig(teacher="t", output="o")
    assert base.targets.mode == "sampled" and base.targets.draw_count == 32  # the shipped default
    changed = base.model_copy(update={field: value})
    assert capture_settings(changed, IDS, "s") != capture_settings(base, IDS, "s")


def test_settings_a_mode_does_not_read_leave_the_plan_alone():
    base = CaptureConfig(teacher="t", output="o", mode="topk")
    for field, value in (("draws", 7), ("seed", 9), ("threshold", 0.3), ("mean_ids", 4.0)):
        assert capture_settings(base.model_copy(update={field: value}), IDS, "s") == capture_settings(base, IDS, "s")


def test_workers_get_the_sections_whole():
    cfg = CaptureConfig(teacher="t", output="o", mode="adaptive", threshold=0.7, max_length=96, batch_tokens=512,
                        threads_per_actor=3, dtype="float32")
    settings = cfg.section(TeacherSettings, vocab_table="o/vocab.parquet")
    for name in TargetsConfig.model_fields:
        assert getattr(settings, name) == getattr(cfg, name)
    assert (settings.max_length, settings.batch_tokens, settings.threads_per_actor) == (96, 512, 3)
    assert settings.vocab_table == "o/vocab.parquet" and settings.section(TargetsConfig) == cfg.targets


def test_worker_settings_fail_as_one_line():
    with pytest.raises(ConfigError, match=r"invalid config for TeacherSettings: 'k'"):
        TeacherSettings(teacher="t", k=0)


def test_a_sweep_shares_typed_run_settings_and_keeps_what_it_owns():
    sweep = SweepConfig(shards="s", output="o", train={"steps": 7, "loss": "tvd", "zero_stage": 3})
    assert isinstance(sweep.train, RunSettings) and sweep.train.steps == 7
    train = TrainConfig(**sweep.train.model_dump(), shards="s", output="o/run")
    assert (train.steps, train.loss, train.zero_stage) == (7, "tvd", 3)
    with pytest.raises(ValueError, match=r"train\.output is set by the sweep"):
        SweepConfig(shards="s", output="o", train={"output": "x"})


def test_a_capture_left_by_the_former_default_is_another_plan():
    """The plan records the effective draws: a capture made with 64 draws by default before the default
    became 32 is never resumed by the same command under the new default."""
    now = CaptureConfig(teacher="t", output="o")
    before = CaptureConfig(teacher="t", output="o", draws=64)
    assert now.targets.recorded()["draws"] == 32
    assert capture_settings(now, IDS, "s") != capture_settings(before, IDS, "s")
