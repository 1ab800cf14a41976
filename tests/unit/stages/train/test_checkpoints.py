"""A resume loads tensors, never code (stages/train/checkpoints.py), without DeepSpeed: a stand-in engine
loads its files the way DeepSpeed does, with ``torch.load(..., weights_only=False)``."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

from raydistill.errors import CheckpointError
from raydistill.stages.train.checkpoints import (
    check_checkpoints,
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
