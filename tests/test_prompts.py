import pytest

from rollout.tasks.registry import TaskSample
from vespo.orchestration.prompts import PromptStream, PromptStreamState

SAMPLES = [TaskSample(str(i), f"{i}+0=", str(i), chat=False) for i in range(5)]


def test_epochs_cover_every_prompt_once_with_unique_group_ids():
    stream = PromptStream(SAMPLES, seed=1)
    first, second = stream.take(5), stream.take(5)
    assert sorted(s.id for _, s in first) == sorted(s.id for _, s in second) == [str(i) for i in range(5)]
    ids = [g for g, _ in first + second]
    assert len(set(ids)) == 10 and ids[5].startswith("e1-p0-")


def test_resume_continues_exactly():
    stream = PromptStream(SAMPLES, seed=3)
    stream.take(7)
    saved = PromptStreamState(stream.state.epoch, stream.state.position)
    expected = stream.take(6)
    assert PromptStream(SAMPLES, seed=3, state=saved).take(6) == expected


def test_empty_task_is_an_error():
    with pytest.raises(ValueError, match="no training prompts"):
        PromptStream([])
