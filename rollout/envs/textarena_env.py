"""Single-player TextArena games as multi-turn environments (`task.env: "textarena:<game id>"`).

TextArena (0.7.4) offers dozens of text games with a reward at the end, which makes them cheap
multi-turn RL tasks. We train one model against the game, so only single-player games fit.
TextArena's API differs from `Environment` in a few ways, and this module closes the gaps:

- API: `ta.make(game_id, **kwargs)` builds the game (the kwargs go to the game's constructor,
  over the registered defaults: `task.env_args` goes there), wrapped in the wrappers registered
  for that id. `reset(num_players=1, seed=...)`, then `get_observation() -> (player_id,
  messages)`, `step(action) -> (done, info)`, and once done `close() -> (rewards, game_info)`.
  Calls are synchronous: they run in a thread (`asyncio.to_thread`).
- Observations: the game keeps a list of `(sender, text, kind)` messages per player, which
  `get_observation` hands over and clears. The observation wrappers registered with a game
  (`LLMObservationWrapper` and the like) keep every message and render the whole history again
  at each turn; the conversation already holds it, so we read the messages from the game under
  the wrappers and send only those that are new, less the echo of the model's own action. The
  action wrappers stay (e.g. `ActionFormattingWrapper` adds the brackets a bare move lacks).
- Rewards: see `game_reward`. Invalid moves are the game's business: with its allowance left
  it says so (a new observation) and waits for another move, past it the game ends.
- Randomness: TextArena seeds Python's global `random` (`random.seed(seed)` on reset) and the
  games draw from it while they play. Episodes run side by side in threads, so each game keeps
  its own copy of the generator's state, swapped in under a process-wide lock for each call:
  a seed always plays the same game whatever else runs, and the process's `random` is left as
  it was. The calls are short pure Python (the GIL serialises them anyway).
- Downloads: a few games fetch NLTK corpora when imported or built (Wordle, Hangman,
  WordSearch, Crosswords, WordLadder); without them, or without network, building the factory
  fails with TextArena's error.
"""

from __future__ import annotations

import asyncio
import difflib
import random
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import textarena as ta
from textarena.envs.registration import ENV_REGISTRY

from rollout.envs.base import EnvStep
from rollout.tasks.base import TaskConfig, TaskSample

T = TypeVar("T")
Message = tuple[int, str, ta.ObservationType]

PLAYER = 0  # the model's player id in a single-player game
SEED_SPAN = 2**30  # train game seeds lie in [0, SEED_SPAN), those of the other splits in [SEED_SPAN, 2 * SEED_SPAN)
EXAMPLES = ("GuessTheNumber-v0", "TowerOfHanoi-v0", "Mastermind-v0", "FrozenLake-v0")

_RANDOM_LOCK = threading.Lock()  # guards the global `random` while a game's own state is swapped in


def game_reward(result: float | None) -> float:
    """The episode's reward from the game's result for player 0, in [0, 1].

    TextArena's single-player games score 1 for a solved game, a fraction for partial progress
    (how close the last guess was, the share of disks placed...) and 0 for a failed one; some
    score -1 for a loss (losing by invalid moves, where the game sets no score, or going broke).
    Results in [0, 1] are kept as they are, so partial credit survives; a negative result maps
    to 0, a failure like any other (an affine (r + 1) / 2 would make a plain failure worth 0.5);
    a result above 1 maps to 1. A game that ends without a result counts 0.
    """
    if result is None:
        return 0.0
    return min(max(float(result), 0.0), 1.0)


def game_seeds(seed: int, split: str, n: int) -> list[int]:
    """`n` distinct game seeds for a split, the same in every process: the train split draws from
    one range, every other split from another, so train and held-out games never share a seed."""
    kind = "train" if split == "train" else "eval"
    low = 0 if kind == "train" else SEED_SPAN
    return random.Random(f"textarena-{kind}-{seed}").sample(range(low, low + SEED_SPAN), n)


def _with_own_random(fn: Callable[[], T], state: Any) -> tuple[T, Any]:
    """Run `fn` with `state` as the global `random`'s state (None: as it stands), and return its
    result with the state it left; the global state is restored afterwards."""
    with _RANDOM_LOCK:
        outer = random.getstate()
        if state is not None:
            random.setstate(state)
        try:
            result = fn()
            return result, random.getstate()
        finally:
            random.setstate(outer)


def _base_game(game: ta.Env) -> ta.Env:
    while isinstance(game, ta.Wrapper):
        game = game.env
    return game


def _new_text(messages: list[Message]) -> str:
    """The game's new messages as one text, without the echo of the player's own action."""
    texts = [text.strip() for _, text, kind in messages if kind != ta.ObservationType.PLAYER_ACTION]
    return "\n\n".join(text for text in texts if text)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if any(c.isalnum() for c in line)]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class TextArenaEnv:
    """One game of one episode: built by `reset`, dropped by `close`."""

    def __init__(self, game_id: str, game_args: dict[str, Any]) -> None:
        self.game_id = game_id
        self.game_args = dict(game_args)
        self._game: ta.Env | None = None
        self._random_state: Any = None
        self._over = False

    async def reset(self, sample: TaskSample) -> list[dict[str, Any]]:
        seed = int((sample.extra_info or {})["seed"])
        text = await self._call(lambda: self._start(seed))
        return [_user(text)]

    async def step(self, turn: str) -> EnvStep:
        if self._game is None or self._over:
            raise RuntimeError("step() needs a game in play: call reset() first, and stop when done")
        done, text, result = await self._call(lambda: self._play(turn))
        if done:
            return EnvStep(reward=game_reward(result), done=True)
        return EnvStep(observation=[_user(text)])

    async def close(self) -> None:
        self._game = None  # a TextArena game holds nothing to release

    async def _call(self, fn: Callable[[], T]) -> T:
        def run() -> T:
            result, self._random_state = _with_own_random(fn, self._random_state)
            return result

        return await asyncio.to_thread(run)

    def _start(self, seed: int) -> str:
        random.seed(seed)  # a game that draws while being built draws the same for a seed
        self._game = ta.make(self.game_id, **self.game_args)
        self._over = False
        self._game.reset(num_players=1, seed=seed)
        return self._take_new()

    def _play(self, turn: str) -> tuple[bool, str, float | None]:
        assert self._game is not None
        done, _ = self._game.step(turn)
        text = self._take_new()
        if not done:
            return False, text, None
        self._over = True
        rewards, _ = self._game.close()
        return True, text, (rewards or {}).get(PLAYER)

    def _take_new(self) -> str:
        assert self._game is not None
        _, messages = _base_game(self._game).get_observation()
        return _new_text(messages)


def _check_known(game_id: str) -> None:
    if game_id in ENV_REGISTRY:
        return
    by_lower = {known.lower(): known for known in ENV_REGISTRY}
    close = [by_lower[m] for m in difflib.get_close_matches(game_id.lower(), by_lower, n=5, cutoff=0.6)]
    hint = f"close names: {', '.join(close)}" if close else f"single-player ones include {', '.join(EXAMPLES)}"
    raise ValueError(f"textarena has no game {game_id!r}; {hint}")


def _check_single_player(game_id: str, game_args: dict[str, Any]) -> None:
    """Build the game and start it with one player: multi-player games refuse (their states assert
    the player count) or start some other kind of state."""
    try:
        game = ta.make(game_id, **game_args)
    except Exception as err:
        raise ValueError(f"textarena could not build {game_id!r} with env_args {game_args}: {_one_line(err)}") from err
    only_one = "only single-player games can be trained on: one model plays against the game, with no opponent"
    try:
        game.reset(num_players=1, seed=0)
    except AssertionError as err:
        raise ValueError(f"textarena game {game_id!r} is multi-player ({_one_line(err)}); {only_one}") from err
    except Exception as err:
        raise ValueError(f"textarena game {game_id!r} failed to start with one player: {_one_line(err)}") from err
    if not isinstance(getattr(_base_game(game), "state", None), ta.SinglePlayerState):
        raise ValueError(f"textarena game {game_id!r} is not a single-player game; {only_one}")


class TextArenaEnvs:
    """`EnvFactory` of a single-player TextArena game: its samples are game seeds."""

    def __init__(self, name: str, cfg: TaskConfig) -> None:
        self.name = name
        self.game_args = dict(cfg.env_args)
        self.seed = cfg.seed
        self.train_size = cfg.train_size
        self.eval_size = cfg.eval_size
        _check_known(name)
        _with_own_random(lambda: _check_single_player(name, self.game_args), None)

    def samples(self, split: str) -> list[TaskSample]:
        n = self.train_size if split == "train" else self.eval_size
        return [
            TaskSample(id=f"{split}-{i}", prompt="", answer="", chat=True, extra_info={"seed": seed})
            for i, seed in enumerate(game_seeds(self.seed, split, n))
        ]

    def make(self) -> TextArenaEnv:
        return TextArenaEnv(self.name, self.game_args)
