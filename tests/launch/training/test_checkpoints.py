"""Which checkpoints a run keeps and which it resumes from: by step number, completion and model."""

from __future__ import annotations

from pathlib import Path

from launch.training.checkpoint_format import COMPLETE_MARKER, checkpoint_candidates, checkpoint_name
from launch.training.checkpointer import model_difference, prune
from weathermixer.config import preset


def make(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / "checkpoints" / checkpoint_name(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / COMPLETE_MARKER).write_text("done\n")
    return folder


def names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir() if p.is_dir())


def test_pruning_keeps_what_latest_names_and_every_newer_checkpoint(tmp_path):
    """The issue's scenario: a folder holds checkpoints 100 and 200 of an earlier phase (a run that
    restarted its step count, or a damaged newer checkpoint resume passed over); the run goes on
    from step 1. Pruning in name order kept the two highest names and deleted what the run had
    just written, leaving ``latest`` naming a deleted folder."""
    make(tmp_path, 100)
    make(tmp_path, 200)
    make(tmp_path, 1, complete=False)  # a save killed before COMPLETE
    for step in (2, 3, 4):
        current = make(tmp_path, step)
        (tmp_path / "checkpoints" / "latest").write_text(current.name)
        prune(tmp_path / "checkpoints", current, keep=2)
    assert names(tmp_path) == [checkpoint_name(s) for s in (3, 4, 100, 200)]
    assert (tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text()).is_dir()


def test_keep_one_leaves_the_current_checkpoint_alone(tmp_path):
    for step in (3, 6):
        make(tmp_path, step)
    assert [p.name for p in prune(tmp_path / "checkpoints", tmp_path / "checkpoints" / checkpoint_name(6), keep=1)] \
        == [checkpoint_name(3)]
    assert names(tmp_path) == [checkpoint_name(6)]


def test_resume_tries_latest_then_the_other_complete_ones_from_the_newest_down(tmp_path):
    for step in (3, 6, 9):
        make(tmp_path, step)
    make(tmp_path, 12, complete=False)
    (tmp_path / "checkpoints" / "latest").write_text(checkpoint_name(6))
    candidates, passed_over = checkpoint_candidates(tmp_path)
    assert [p.name for p in candidates] == [checkpoint_name(s) for s in (6, 9, 3)]
    assert [(p.name, reason.split(":")[0]) for p, reason in passed_over] == [(checkpoint_name(12),
                                                                              f"no {COMPLETE_MARKER} marker")]


def test_a_latest_pointing_nowhere_is_reported_and_the_complete_ones_remain(tmp_path):
    make(tmp_path, 3)
    (tmp_path / "checkpoints" / "latest").write_text(checkpoint_name(9))
    candidates, passed_over = checkpoint_candidates(tmp_path)
    assert [p.name for p in candidates] == [checkpoint_name(3)]
    assert "does not exist" in passed_over[0][1]


def test_a_checkpoint_of_another_model_is_told_by_the_keys_that_differ():
    """A checkpoint of an FP8 run whose embedding and decoder took bf16 gradients (the default
    until ``model.fp8_backward_groups`` took them into FP8) names that key and both values; a key
    a checkpoint predates (``model.fp8_history``) takes its default and is no difference."""
    mine = preset("tiny").replace(fp8="delayed").to_dict()
    saved = {**mine, "fp8_backward_groups": [], "hidden": 2 * mine["hidden"]}
    assert model_difference(saved, mine) == (
        f"model.fp8_backward_groups is [] there, ['embedding', 'decoder'] in this run, "
        f"model.hidden is {2 * mine['hidden']} there, {mine['hidden']} in this run")
    older = {key: value for key, value in mine.items() if key != "fp8_history"}
    assert model_difference(older, mine) == ""
