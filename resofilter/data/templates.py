"""Prompt templates: how a record's query becomes the prompt the response follows.

A template renders the prompt text; the response text (plus an optional suffix) follows
it and only the response tokens are trained on / scored. Swappable via the ``template=``
config group; each implementation satisfies the :class:`Template` protocol.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from resofilter.data.records import Record
from resofilter.errors import ConfigError


@runtime_checkable
class Template(Protocol):
    name: str
    #: whether the tokenizer should add its special tokens (BOS) when encoding the prompt;
    #: False when the rendered prompt already carries them (chat templates).
    add_special_tokens: bool
    response_suffix: str

    def render_prompt(self, query: str, input: str | None, tokenizer: Any) -> str: ...


class FormatTemplate:
    """A ``str.format`` prompt with ``{query}`` (and ``{input}`` in ``prompt_with_input``)."""

    def __init__(
        self,
        name: str,
        prompt: str,
        prompt_with_input: str | None = None,
        response_suffix: str = "",
        add_special_tokens: bool = True,
    ) -> None:
        if "{query}" not in prompt:
            raise ConfigError("template.prompt", "must contain the placeholder {query}")
        self.name = name
        self.prompt = prompt
        self.prompt_with_input = prompt_with_input
        self.response_suffix = response_suffix
        self.add_special_tokens = add_special_tokens

    def render_prompt(self, query: str, input: str | None, tokenizer: Any = None) -> str:
        if input and self.prompt_with_input:
            return self.prompt_with_input.format(query=query, input=input)
        if input:  # no dedicated form: append the input to the query
            query = f"{query}\n\n{input}"
        return self.prompt.format(query=query)


class ChatTemplate:
    """The tokenizer's own ``apply_chat_template`` with one user turn."""

    def __init__(self, name: str = "chat_template", system: str | None = None,
                 response_suffix: str = "") -> None:
        self.name = name
        self.system = system
        self.response_suffix = response_suffix
        self.add_special_tokens = False

    def render_prompt(self, query: str, input: str | None, tokenizer: Any) -> str:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("template", "template=chat_template but the tokenizer has no chat template")
        content = f"{query}\n\n{input}" if input else query
        messages = [{"role": "user", "content": content}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render(template: Template, record: Record, tokenizer: Any) -> tuple[str, str]:
    """(prompt, response) text of a record under ``template``."""
    prompt = template.render_prompt(record.query, record.input, tokenizer)
    return prompt, record.response + template.response_suffix
