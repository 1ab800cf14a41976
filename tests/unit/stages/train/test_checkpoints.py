"""A resume loads tensors, never code (stages/train/checkpoints.py), without DeepSpeed: a stand-in engine
loads its files the way DeepSpeed does, with ``torch.load(..., weights_only=False)``."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from raydistill.errors import CheckpointError, PlanMismatchError
from raydistill.stages.train.checkpoints import (
    TRAIN_CONFIG_FILE,
    check_checkpoints,
    check_resume_settings,
    load_deepspeed_checkpoint,
    weights_only_torch_load,
)

TAG = "step"
STATES = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint could do with a full unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class DeepSpeedLikeEngine:
    def __init__(self):
        self.loaded = None

    def load_checkpoint(self, directory: str, tag: str):
        self.loaded = torch.load(os.path.join(directory, tag, STATES), map_location="cpu", weights_only=False)
        return directory, {}


def checkpoint(root, content, **save) -> str:
    (root / TAG).mkdir(parents=True)
    torch.save(content, root / TAG / STATES, **save)
    return str(root)


def test_a_planted_pickle_runs_under_a_full_load(tmp_path):
    """The payload is live: this is what DeepSpeed's own load would do with it."""
    marker = tmp_path / "owned"
    directory = checkpoint(tmp_path / "ckpt", {"module": Payload(str(marker))})
    DeepSpeedLikeEngine().load_checkpoint(directory, TAG)
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_planted_pickle_is_refused_in_one_line_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "owned"
    directory = checkpoint(tmp_path / "ckpt", {"module": Payload(str(marker))},
                           _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as err:
        load_deepspeed_checkpoint(DeepSpeedLikeEngine(), directory, TAG)
    message = str(err.value)
    assert "\n" not in message and directory in message and "could run code" in message, message
    assert "open" in message, message  # the global it refused
    assert not marker.exists()
    assert torch.load is torch.serialization.load  # the patch is gone after an error too


def test_the_driver_refuses_a_planted_zip_checkpoint_before_loading_it(tmp_path):
    marker = tmp_path / "owned"
    directory = checkpoint(tmp_path / "ckpt", {"module": Payload(str(marker))})
    with pytest.raises(CheckpointError) as err:
        check_checkpoints(directory)
    assert STATES in str(err.value) and "open" in str(err.value)
    assert not marker.exists()


def test_a_checkpoint_of_tensors_and_plain_data_loads_and_passes_the_check(tmp_path):
    state = {"module": {"w": torch.arange(6.0).reshape(2, 3)}, "global_steps": 3, "ds_version": "0.19.8",
             "param_shapes": [{"w": torch.Size([2, 3])}], "lr_scheduler": {"last_batch_iteration": 2}}
    directory = checkpoint(tmp_path / "ckpt", state)
    check_checkpoints(directory)
    engine = DeepSpeedLikeEngine()
    load_deepspeed_checkpoint(engine, directory, TAG)
    assert torch.equal(engine.loaded["module"]["w"], state["module"]["w"]) and engine.loaded["global_steps"] == 3


def test_a_truncated_file_is_left_to_the_weights_only_load(tmp_path):
    """A checkpoint cut short by a killed upload (Ray Train never resumes from one) is not refused by the
    driver's scan, which reads opcodes only; loading it fails in the weights-only load, running nothing."""
    directory = checkpoint(tmp_path / "ckpt", {"module": {"w": torch.zeros(3)}})
    path = tmp_path / "ckpt" / TAG / STATES
    path.write_bytes(path.read_bytes()[:40])
    check_checkpoints(directory)
    with pytest.raises((RuntimeError, zipfile.BadZipFile, OSError, EOFError)):
        load_deepspeed_checkpoint(DeepSpeedLikeEngine(), directory, TAG)


def test_every_torch_load_inside_the_block_is_weights_only(tmp_path):
    torch.save({"x": Payload(str(tmp_path / "owned"))}, tmp_path / "f.pt")
    with weights_only_torch_load(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "f.pt", weights_only=False)
    assert not (tmp_path / "owned").exists()
    assert torch.load is torch.serialization.load


def _run_with_checkpoint(tmp_path, stored: dict) -> str:
    """A run's Ray Train folder holding one checkpoint whose rank 0 wrote ``stored`` as its train config."""
    root = tmp_path / "ray" / "student"
    (root / "checkpoint_000001").mkdir(parents=True)
    (root / "checkpoint_000001" / TRAIN_CONFIG_FILE).write_text(json.dumps(stored))
    return str(root)


def test_a_checkpoint_of_other_settings_is_never_resumed(tmp_path):
    """Ray Train resumes whatever checkpoint the name holds: a rerun with another lr would continue the old run
    (or, finished, just re-export its weights under the new settings). Refused in one line naming the field."""
    config = {"lr": 0.003, "steps": 100, "seed": 0, "student": {"size": "tiny"}}
    root = _run_with_checkpoint(tmp_path, config)
    with pytest.raises(PlanMismatchError) as err:
        check_resume_settings(root, {**config, "lr": 0.001}, {})
    message = str(err.value)
    assert "\n" not in message and "lr 0.003 there, 0.001 now" in message and root in message
    with pytest.raises(PlanMismatchError, match=r"seed 0 there, 1 now \(and 1 more: student\)"):
        check_resume_settings(root, {**config, "student": {"size": "small"}, "seed": 1}, {})


def test_how_long_and_how_it_reports_may_change_on_resume(tmp_path):
    config = {"lr": 0.003, "steps": 100, "log_every": 10, "checkpoint_every": 5}
    root = _run_with_checkpoint(tmp_path, config)
    check_resume_settings(root, {**config, "steps": 200, "log_every": 5, "checkpoint_every": 0}, {})


def test_settings_added_since_a_checkpoint_count_as_their_defaults(tmp_path):
    root = _run_with_checkpoint(tmp_path, {"lr": 0.003})
    check_resume_settings(root, {"lr": 0.003, "fused_loss": True}, {"fused_loss": True})
    with pytest.raises(PlanMismatchError, match="fused_loss True there, False now"):
        check_resume_settings(root, {"lr": 0.003, "fused_loss": False}, {"fused_loss": True})


def test_no_checkpoints_or_a_cut_one_are_left_alone(tmp_path):
    check_resume_settings(str(tmp_path / "nothing"), {"lr": 1.0}, {})
    root = _run_with_checkpoint(tmp_path, {})
    (tmp_path / "ray" / "student" / "checkpoint_000001" / TRAIN_CONFIG_FILE).write_text('{"lr": 0.0')
    check_resume_settings(root, {"lr": 1.0}, {})
