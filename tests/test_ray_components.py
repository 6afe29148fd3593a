"""Ray's errors in the loop's terms (vespo.orchestration.ray_components): the fault tests on fakes raise
EngineDown and EngineLost directly, so the translation from what Ray raises is checked here,
on Ray's own exception classes (no cluster needed)."""

from __future__ import annotations

import pytest
import ray.exceptions as rex

from rollout.actor import EngineNotStarted
from vespo.orchestration import ray_components
from vespo.orchestration.contracts import EngineDown, EngineLost
from vespo.orchestration.ray_components import RayPending, _engine_error


def failing(monkeypatch, err: BaseException, engine: bool = True) -> RayPending:
    """A pending call whose ray.get raises err, as a call to a dead or restarting actor does."""

    def get(refs, timeout=None):
        raise err

    monkeypatch.setattr(ray_components.ray, "get", get)
    return RayPending(object(), engine=engine)


def test_a_dead_actor_ray_will_not_restart_is_lost_for_good():
    assert isinstance(_engine_error(rex.ActorDiedError()), EngineLost)


@pytest.mark.parametrize(
    "err",
    [
        rex.ActorUnavailableError("restarting", b"\x00" * 16),  # Ray is restarting it
        rex.RayTaskError("poll", "traceback", EngineNotStarted("no engine")).as_instanceof_cause(),  # back, no engine
    ],
    ids=["unavailable", "restarted-without-engine"],
)
def test_an_engine_ray_is_restarting_is_down_for_now(err):
    translated = _engine_error(err)
    assert isinstance(translated, EngineDown) and not isinstance(translated, EngineLost)


def test_any_other_failure_passes_through_unchanged(monkeypatch):
    bug = rex.RayTaskError("generate", "traceback", ZeroDivisionError("x")).as_instanceof_cause()
    assert _engine_error(bug) is bug
    with pytest.raises(ZeroDivisionError):
        failing(monkeypatch, bug).result()


def test_a_pending_engine_call_raises_the_loops_terms_and_keeps_the_cause(monkeypatch):
    with pytest.raises(EngineLost) as lost:
        failing(monkeypatch, rex.ActorDiedError()).result()
    assert isinstance(lost.value.__cause__, rex.ActorDiedError)
    with pytest.raises(EngineDown):
        failing(monkeypatch, rex.ActorUnavailableError("restarting", b"\x00" * 16)).result()
    # a learner call (engine=False) is not an engine's death: Ray's error reaches the controller as is
    with pytest.raises(rex.ActorDiedError):
        failing(monkeypatch, rex.ActorDiedError(), engine=False).result()
