"""Render a Hugging Face Jinja chat template exactly as transformers does.

Chat templates come from model folders, so they are untrusted code: they run in jinja2's
immutable sandbox, with the same environment transformers builds (trim_blocks, lstrip_blocks,
loopcontrols, a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and a
`{% generation %}` block that just renders its body). Variables: `messages`,
`add_generation_prompt`, `tools` (None), `documents` (None), and the special tokens
(`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template failed to render (it raised, or it is not valid Jinja)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does (no CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


class ChatTemplate:
    """One compiled template with the special tokens it sees."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template is not valid Jinja: {exc}") from exc
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def read_chat_template(folder: str | Path) -> ChatTemplate:
    """The chat template of a Hugging Face folder, where transformers looks for it.

    `chat_template.jinja` first (transformers >= 4.43 saves it there), then `chat_template` in
    `tokenizer_config.json` (a string, or a list of named templates: "default" is used), then
    `chat_template.json`. Special tokens come from `special_tokens_map.json` overridden by
    `tokenizer_config.json`, as strings or `{"content": ...}` objects.
    """
    folder = Path(folder)
    tokenizer_config = _read_json_object(folder / "tokenizer_config.json")
    special_tokens: dict[str, str] = {}
    for source in (_read_json_object(folder / "special_tokens_map.json"), tokenizer_config):
        for key in SPECIAL_TOKEN_KEYS:
            token = _token_text(source.get(key))
            if token is not None:
                special_tokens[key] = token

    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return ChatTemplate(template_file.read_text(encoding="utf-8"), special_tokens)
    source = tokenizer_config.get("chat_template")
    if source is None:
        source = _read_json_object(folder / "chat_template.json").get("chat_template")
    if isinstance(source, list):
        named = {
            entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)
        }
        source = named.get("default")
    if not isinstance(source, str) or not source:
        raise ChatTemplateError(
            f"no chat template in {str(folder)!r} (looked for chat_template.jinja, "
            "tokenizer_config.json 'chat_template', chat_template.json)"
        )
    return ChatTemplate(source, special_tokens)


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
