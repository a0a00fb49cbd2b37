"""Chat prompts: the tokenizer's own Jinja2 chat template, rendered as transformers renders it.

The released drafters were trained on their target's answers in chat format (non-thinking), and
DeepSpec wraps every evaluation prompt with ``apply_chat_template(add_generation_prompt=True,
enable_thinking=False)``; feeding raw text puts the target in another mode and the drafter off
its training distribution. Templates come from the hub, so they run in jinja2's immutable
sandbox with the environment transformers gives them (``trim_blocks``, ``lstrip_blocks``,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text, loop controls, the
``{% generation %}`` tag); no transformers at run time. The rendered text is tokenized without
the tokenizer's own special tokens (the template writes its BOS itself), as transformers does.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Mapping, Sequence

ROLES = ("system", "user", "assistant", "tool")
# the named special tokens transformers passes to every template (``special_tokens_map``)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"
_PROBE = "dspark-jax-end-of-turn-probe"


class ChatError(ValueError):
    """A chat template or message list that cannot be rendered; the message names file and cause."""


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken object."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ChatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ChatError(f"{path}: expected a JSON object")
    return raw


def _template_text(config_template, where: str) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (the "default" one)."""
    if config_template is None or isinstance(config_template, str):
        return config_template
    if isinstance(config_template, list):
        named = {t.get("name"): t.get("template") for t in config_template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default' template")
    raise ChatError(f"{where}: chat_template must be a string or a list of named templates")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # ``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
        # rendering only needs its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own filter escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    source: str
    path: str  # where it was read from (for error messages)
    special_tokens: Mapping[str, str]
    compiled: Any = dataclasses.field(repr=False, compare=False, default=None)

    @classmethod
    def from_string(cls, source: str, path: str = "<chat template>", special_tokens: Mapping[str, str] | None = None):
        import jinja2

        try:
            compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"{path}: chat template does not compile (line {e.lineno}: {e.message})") from None
        return cls(source, path, dict(special_tokens or {}), compiled)

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
               enable_thinking: bool = False, **kwargs) -> str:
        """The conversation as text, the way ``apply_chat_template(tokenize=False)`` writes it."""
        import jinja2

        messages = check_messages(messages)
        context = {**self.special_tokens, **kwargs}
        try:
            return self.compiled.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking, **context)
        except jinja2.TemplateError as e:
            raise ChatError(f"{self.path}: the chat template raised: {e.message or e}") from None


def load_chat_template(tokenizer_path: str | os.PathLike) -> ChatTemplate | None:
    """The chat template beside a tokenizer (``chat_template.jinja`` or ``chat_template`` in
    ``tokenizer_config.json``), with its special tokens; None when there is none."""
    path = os.fspath(tokenizer_path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    special_path = os.path.join(directory, "special_tokens_map.json")
    special_map = _read_json(special_path) if os.path.isfile(special_path) else {}
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is None:
            text = _token_text(special_map.get(name))
        if text is not None:
            special[name] = text
    jinja_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return ChatTemplate.from_string(f.read(), jinja_path, special)
    source = _template_text(config.get("chat_template"), config_path)
    if source is None:
        return None
    return ChatTemplate.from_string(source, config_path, special)


def check_messages(messages, where: str = "messages") -> list[dict]:
    """A list of ``{"role", "content"}`` dicts (None-valued keys dropped, as transformers does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError(f"{where}: expected a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"{where}: message {i} is {type(m).__name__}, expected an object with role and content")
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") not in ROLES:
            raise ChatError(f"{where}: message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if "content" not in m:
            raise ChatError(f"{where}: message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], (str, list)):
            raise ChatError(f"{where}: message {i} ({m['role']}) content is {type(m['content']).__name__}, "
                            "expected a string")
        out.append(m)
    return out


def read_messages(path: str | os.PathLike) -> list[dict]:
    """A ``--messages`` file: a JSON list of ``{"role", "content"}`` objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ChatError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}: not valid JSON ({e})") from None
    return check_messages(raw, path)


def chat_messages(user: str, system: str | None = None) -> list[dict]:
    """One user turn, after an optional system message."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def encode_chat(tokenizer, template: ChatTemplate, messages: Sequence[Mapping], *,
                add_generation_prompt: bool = True, enable_thinking: bool = False) -> list[int]:
    """Token ids of the rendered conversation (the template writes the special tokens itself)."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def end_of_turn_id(tokenizer, template: ChatTemplate) -> int | None:
    """The special token the template closes an assistant turn with (``<|im_end|>``,
    ``<end_of_turn>``): the first token after an assistant message, if it is a special token.
    A model in chat mode ends its answer with it, so decoding stops there."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = template.render(conversation, add_generation_prompt=False)
    except ChatError:
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    ids = tokenizer.encode(text[at + len(_PROBE):].lstrip(), add_special_tokens=False)
    return ids[0] if ids and tokenizer.is_special(ids[0]) else None


def first_turn_encoder(tokenizer, template: ChatTemplate | None):
    """DeepSpec's evaluation rule for a ``{"turns": [...]}`` prompt: its first turn as the one
    user message, the generation prompt added, thinking off (``encode_chat_messages``). Returns
    ``text -> ids``, or None without a template (the text is then fed raw)."""
    if template is None:
        return None
    return lambda text: encode_chat(tokenizer, template, chat_messages(text))


def with_stop_id(cfg, token_id: int | None):
    """A target config that also stops at ``token_id`` (the template's end of turn)."""
    if token_id is None or token_id in cfg.eos_token_ids:
        return cfg
    return dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + (int(token_id),))
