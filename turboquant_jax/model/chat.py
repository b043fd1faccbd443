"""Renders a Hugging Face / GGUF Jinja chat template (e.g. ChatML) to text."""

from collections.abc import Mapping
from collections.abc import Sequence
import json
from typing import Any

import jinja2
from jinja2 import ext
from jinja2 import sandbox


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, indent: int | None = None) -> str:
  return json.dumps(x, ensure_ascii=False, indent=indent)


def _environment() -> sandbox.ImmutableSandboxedEnvironment:
  # The settings transformers uses for chat templates, so templates written
  # for it render identically.
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  return env


def apply_chat_template(template: str,
                        messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool = True,
                        **kwargs: Any) -> str:
  """Renders a chat as the model's prompt text.

  Args:
    template: the Jinja template (`GGUFModel.chat_template`, or
      `chat_template` of a Hugging Face tokenizer_config.json).
    messages: [{"role": "user", "content": "..."}, ...].
    add_generation_prompt: end with the opening of an assistant turn (for
      SmolLM2's ChatML: "<|im_start|>assistant\\n").
    **kwargs: more template variables (e.g. bos_token="<s>").

  Returns:
    The prompt text; special tokens appear as text (`<|im_start|>`), which
    the GGUF tokenizer encodes to their single ids.
  """
  if not isinstance(template, str) or not template:
    raise ValueError(f"{template=} must be a non-empty string")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message:
      raise ValueError(f"messages[{i}]={message!r} must be a mapping with a "
                       "'role'")
  compiled = _environment().from_string(template)
  return compiled.render(messages=list(messages),
                         add_generation_prompt=add_generation_prompt,
                         **kwargs)
