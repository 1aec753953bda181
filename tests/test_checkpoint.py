"""Checkpoints: atomic save, weights_only load, and refusal of anything that would run code."""

import os
import pickle
import random
import re

import numpy as np
import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.model import MODEL_SIZES, TTSModel


class RunsCode:
    """Unpickling this calls a function: the attack weights_only exists to stop."""

    def __reduce__(self):
        return (os.getcwd, ())


def plain_checkpoint():
    model = TTSModel(MODEL_SIZES["tiny"], 12)
    optimizer = torch.optim.AdamW(model.parameters())
    model(
        {
            "tokens": torch.tensor([[1, 2, 3]]),
            "token_lens": torch.tensor([3]),
            "mels": torch.randn(1, 80, 8),
            "mel_lens": torch.tensor([8]),
            "pitch": torch.randn(1, 8),
            "energy": torch.randn(1, 8),
            "spk_emb": torch.randn(1, 256),
        }
    )["mel_pred"].mean().backward()
    optimizer.step()
    return model, {
        "model": model.state_dict(),
        "model_config": MODEL_SIZES["tiny"].to_dict(),
        "size": "tiny",
        "optimizer": optimizer.state_dict(),
        "scheduler": {"lr_scale": 0.5},
        "step": 7,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        },
        "symbols": ["<pad>", "a", "b"],
        "val_loss": None,
        "speakers": {"awb": [0.1] * 4},
    }


def test_round_trip_with_weights_only(tmp_path):
    model, ckpt = plain_checkpoint()
    path = save_checkpoint(tmp_path / "sub" / "step.pt", ckpt)
    assert path.is_file()
    # The file itself loads with plain torch.load(weights_only=True), not only through us.
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["symbols"] == ["<pad>", "a", "b"]
    fresh = TTSModel(MODEL_SIZES["tiny"], 12)
    fresh.load_state_dict(loaded["model"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    optimizer = torch.optim.AdamW(fresh.parameters())
    optimizer.load_state_dict(loaded["optimizer"])
    assert torch.equal(loaded["rng"]["torch"], ckpt["rng"]["torch"])
    # No temporary file is left behind.
    assert [p.name for p in path.parent.iterdir()] == ["step.pt"]


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"hook": len}, "checkpoint['rng']['hook'] is a builtins.builtin_function_or_method"),
        ({"numpy": np.zeros(2)}, "checkpoint['rng']['numpy'] is a numpy.ndarray"),
    ],
)
def test_unloadable_values_are_refused_before_writing(tmp_path, bad, where):
    _, ckpt = plain_checkpoint()
    path = save_checkpoint(tmp_path / "last.pt", ckpt)
    with pytest.raises(CheckpointError, match=re.escape(where)):
        save_checkpoint(path, {**ckpt, "step": 8, "rng": bad})
    # The previous checkpoint is untouched and no temporary file is left behind.
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {}, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        load_checkpoint(path)


def test_numpy_arrays_are_refused_too(tmp_path):
    path = tmp_path / "numpy.pt"
    torch.save({"format_version": 1, "model": {}, "rng": np.random.get_state()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "not a readable checkpoint"),
        (pickle.dumps({"model": 1}), "not a readable checkpoint"),
    ],
)
def test_garbage_is_a_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_torch_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this studio"):
        load_checkpoint(path)


def test_missing_and_newer_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "future.pt"
    torch.save({"format_version": 99, "model": {}}, path)
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_checkpoint(path)
