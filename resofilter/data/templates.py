"""Prompt templates: how a record's query becomes the prompt the response follows.

A template renders the prompt text (masked); the labelled part follows it — an optional
``response_prefix``, the response, an optional ``response_suffix`` — and only those tokens are
trained on / scored. The authors' Gemma layout labels the model-turn marker and the end of
turn: prompt ``<start_of_turn>user\n{query}<end_of_turn>\n``, labels
``<start_of_turn>model\n{response}<end_of_turn>`` + EOS (``template=gemma_turns``). Generation
continues a prompt that ends with the prefix and stops at the suffix. Swappable via the
``template=`` config group; each implementation satisfies the :class:`Template` protocol.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, runtime_checkable

from resofilter.data.records import Record
from resofilter.errors import ConfigError


@runtime_checkable
class Template(Protocol):
    name: str
    #: whether the tokenizer should add its special tokens (BOS) when encoding the prompt;
    #: False when the rendered prompt already carries them (chat templates).
    add_special_tokens: bool
    response_prefix: str  # labelled text before the response (the model-turn marker), "" for none
    response_suffix: str  # labelled text after it (the end-of-turn marker); EOS follows, per tokenize.append_eos

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
        response_prefix: str = "",
    ) -> None:
        if "{query}" not in prompt:
            raise ConfigError("template.prompt", "must contain the placeholder {query}")
        self.name = name
        self.prompt = prompt
        self.prompt_with_input = prompt_with_input
        self.response_prefix = response_prefix
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
        self.response_prefix = ""  # the chat template's generation prompt already opens the model's turn
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
    """(prompt, labelled text) of a record under ``template``: the prompt is masked, the labelled
    text is ``response_prefix + response + response_suffix``, tokenized on its own (no BOS)."""
    prompt = template.render_prompt(record.query, record.input, tokenizer)
    return prompt, getattr(template, "response_prefix", "") + record.response + template.response_suffix


def generation_prompt(template: Template, query: str, input: str | None, tokenizer: Any) -> str:
    """What generation continues: the prompt, then the labelled prefix the model was trained to follow it with."""
    return template.render_prompt(query, input, tokenizer) + getattr(template, "response_prefix", "")


def template_identity(template: Template, tokenizer: Any = None) -> str:
    """What a template renders, for cache keys: the generation prompt of the query ``{q}``. A chat template
    renders through the tokenizer's own template; without a tokenizer (the embedded model, whose tokenizer is
    built from this key) it is named by its settings, the tokenizer's template then being part of the model."""
    if isinstance(template, ChatTemplate) and tokenizer is None:
        return f"chat_template(system={template.system!r}, suffix={template.response_suffix!r})"
    return generation_prompt(template, "{q}", None, tokenizer)


def generation_stops(template: Template) -> list[str]:
    """Where a generation under ``template`` ends besides EOS: the labelled suffix (``<end_of_turn>``)."""
    suffix = template.response_suffix.strip()
    return [suffix] if suffix else []


_MARKER = re.compile(r"<[^<>\s{}]+>")  # <start_of_turn>, <|im_start|>, …: meant as single special tokens


def check_fits(template: Template, tokenizer: Any, key: str = "template") -> None:
    """Every turn marker the template writes (``<start_of_turn>``, ``<|im_end|>``) is one token of
    ``tokenizer``: a template written for another model's tokenizer would otherwise be spelled out
    character by character and trained on as text. ConfigError naming ``key`` otherwise."""
    texts = [getattr(template, a, "") or "" for a in ("prompt", "prompt_with_input", "response_prefix",
                                                      "response_suffix")]
    for marker in sorted({m for t in texts for m in _MARKER.findall(t)}):
        if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
            raise ConfigError(key, f"template {template.name!r} writes {marker!r}, which "
                              f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} does not know as "
                              "one token: pick a template of this model's tokenizer (train_template for the "
                              "fine-tuned model)")
