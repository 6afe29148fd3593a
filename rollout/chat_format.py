"""An episode's messages as tokens, each rendered through the chat template exactly once.

The model's turns stay the token ids it sampled: decoding them and encoding the text again can
give other ids (a number split differently, a space merged into a word), and the learner would
then train on tokens the sampler never produced, with log-probs that belong to other tokens.
So only the environment's messages are rendered: the template is applied to a fixed stand-in
conversation with and without the new messages, and the difference is the text to append (the
end of the model's turn as the template closes it, then the new messages and the next
generation prompt). That text is tokenized on its own and appended after the sampled ids.
"""

from __future__ import annotations

from typing import Any

from rollout.tools.calls import tool_system_prompt

_MARK = "\u2063vespo-turn\u2063"  # content of the stand-in assistant turn: found again by search
_STAND_IN = [{"role": "user", "content": "\u2063"}, {"role": "assistant", "content": _MARK}]


class ChatFormatError(ValueError):
    """A chat template that cannot extend a conversation without re-rendering earlier turns."""


class ChatFormat:
    def __init__(self, tokenizer, tools: list[dict[str, Any]] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError("multi-turn episodes need a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.tools = tools or None
        # a template that ignores `tools=` gets them described in a system turn instead
        self.tools_in_template = bool(self.tools) and self._render(_STAND_IN, False, self.tools) != self._render(
            _STAND_IN, False, None
        )
        self.stop_ids = _stop_ids(tokenizer)
        base = self._render(_STAND_IN, False)
        self._base = base
        self._closing = base[base.rindex(_MARK) + len(_MARK) :]  # what the template writes after a turn

    def _render(self, messages: list[dict], generation_prompt: bool, tools=...) -> str:
        tools = self.tools if tools is ... else tools
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def opening(self, messages: list[dict[str, Any]]) -> list[int]:
        """The episode's prompt: its opening messages and the first generation prompt."""
        messages = [dict(m) for m in messages]
        if self.tools and not self.tools_in_template:
            described = tool_system_prompt(self.tools)
            if messages and messages[0].get("role") == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{described}"
            else:
                messages.insert(0, {"role": "system", "content": described})
        text = self._render(messages, True, self.tools if self.tools_in_template else None)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def after_turn(self, turn_ids: list[int], messages: list[dict[str, Any]]) -> list[int]:
        """The ids to append after a model turn `turn_ids` (as sampled): the turn's closing as
        the template writes it, the environment's `messages`, and the next generation prompt."""
        full = self._render([*_STAND_IN, *messages], True)
        if not full.startswith(self._base):
            raise ChatFormatError("the chat template renders earlier turns differently once more follow")
        closing, lead = self._closing, []
        ended = bool(turn_ids) and turn_ids[-1] in self.stop_ids
        if ended:
            stop_text = self.tokenizer.decode([turn_ids[-1]])
            closing = closing[len(stop_text) :] if closing.startswith(stop_text) else closing
        elif self.stop_ids and not any(self.tokenizer.decode([s]) in closing for s in self.stop_ids):
            lead = [min(self.stop_ids)]  # a cut-off turn is closed the way the model closes one
        text = closing + full[len(self._base) :]
        return lead + self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _stop_ids(tokenizer) -> set[int]:
    ids = tokenizer.eos_token_id
    return set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
