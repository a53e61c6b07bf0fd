"""Chat formats: pieces built turn by turn equal the whole conversation rendered at once."""

from __future__ import annotations

import logging

import pytest

from app.chat.chat_format import SimpleChatFormat, TemplateChatFormat
from app.chat.chat_template import ChatTemplate, ChatTemplateError, read_chat_template
from app.chat.tokenizer import HFTokenizer
from app.engine.loading.builtin import builtin_tokenizer

CONVERSATION = [
    ("Hello! Who are you?", "I am an assistant, here to help."),
    ("Tell me a joke 🙂 — in Köln style.", "Why did the chicken cross the road?"),
    ("你好? One more, please.", None),
]


def template_format(folder, name="test-model") -> TemplateChatFormat:
    tokenizer = HFTokenizer.from_folder(folder)
    template = read_chat_template(folder)
    eos = frozenset({tokenizer.token_to_id(template.special_tokens["eos_token"])})
    return TemplateChatFormat(template, tokenizer, eos, model_name=name)


def build_log(chat_format, tokenizer, system, end_with_eot: bool) -> tuple[list[int], list[dict]]:
    """The token log the service would build, and the same conversation as messages."""
    log = list(chat_format.start(system))
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, reply in CONVERSATION:
        log += chat_format.user_turn(user)
        messages.append({"role": "user", "content": user})
        if reply is None:
            break
        generated = tokenizer.encode(reply)
        if end_with_eot:
            # The model stops by generating the end-of-turn token itself.
            generated.append(min(chat_format.stop_token_ids & tokenizer.special_token_ids))
            log += generated + chat_format.assistant_end(generated, "stop")
        else:
            log += generated + chat_format.assistant_end(generated, "length")
        messages.append({"role": "assistant", "content": reply})
    return log, messages


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
@pytest.mark.parametrize("system", ["You are terse.", None])
@pytest.mark.parametrize("end_with_eot", [False, True])
def test_incremental_log_equals_transformers_render(tokenizer_folders, kind, system, end_with_eot):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folders[kind]
    chat_format = template_format(folder)
    assert chat_format.is_incremental_exact, chat_format.probe_failure
    log, messages = build_log(chat_format, HFTokenizer.from_folder(folder), system, end_with_eot)

    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert log == expected


def test_chatml_pieces(tokenizer_folders):
    chat_format = template_format(tokenizer_folders["chatml"])
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["chatml"])
    im_end = tokenizer.token_to_id("<|im_end|>")
    newline = tokenizer.encode("\n")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731

    # No system message: the template's default one opens the thread.
    assert decode(chat_format.start(None)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    )
    assert decode(chat_format.start("Be brief.")) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert decode(chat_format.user_turn("Hi")) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert im_end in chat_format.stop_token_ids
    generated = tokenizer.encode("Hello")
    assert chat_format.assistant_end(generated, "length") == [im_end, *newline]
    assert chat_format.assistant_end([*generated, im_end], "stop") == newline
    assert chat_format.assistant_end([], "length") == [im_end, *newline]


def test_llama3_pieces(tokenizer_folders):
    chat_format = template_format(tokenizer_folders["llama3"])
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["llama3"])
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert chat_format.start(None) == [tokenizer.token_to_id("<|begin_of_text|>")]
    assert tokenizer.decode(chat_format.user_turn("  Hi  "), skip_special_tokens=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chat_format.stop_token_ids == {eot}
    assert chat_format.assistant_end([5, eot], "stop") == []
    assert chat_format.assistant_end([5, 6], "length") == [eot]
    with pytest.raises(ValueError, match="finish_reason"):
        chat_format.assistant_end([5], "cancelled")


@pytest.mark.parametrize("kind", ["reasoning", "windowed"])
def test_template_that_is_not_prefix_stable_warns(tokenizer_folders, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="app.chat.chat_format"):
        chat_format = template_format(tokenizer_folders[kind], name=f"{kind}-model")
    assert not chat_format.is_incremental_exact
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"{kind}-model" in message and "not prefix-stable" in message
    # The pieces still work: the log can be built, it just is not a whole-conversation render.
    assert chat_format.user_turn("Hi")


def test_prefix_stable_template_does_not_warn(tokenizer_folders, caplog):
    with caplog.at_level(logging.WARNING, logger="app.chat.chat_format"):
        template_format(tokenizer_folders["chatml"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_system_folded_into_first_user_message(tokenizer_folders, caplog):
    """Llama 2 style: a thread without a system message works; one with cannot be opened."""
    llama2 = (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}"
        "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '<|im_start|>[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' <|im_end|>' }}"
        "{% endif %}{% endfor %}"
    )
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["chatml"])
    with caplog.at_level(logging.WARNING, logger="app.chat.chat_format"):
        chat_format = TemplateChatFormat(
            ChatTemplate(llama2, {"eos_token": "<|im_end|>"}), tokenizer, model_name="llama2ish"
        )
    assert not chat_format.is_incremental_exact
    assert "first user message" in caplog.records[0].getMessage()
    assert chat_format.start(None) == []
    with pytest.raises(ChatTemplateError, match="first user message"):
        chat_format.start("Be brief.")


def test_missing_template_is_a_clear_error(tokenizer_folders):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        read_chat_template(tokenizer_folders["no_template"])


def test_template_errors_are_clear(tokenizer_folders):
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["chatml"])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}", {})
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        TemplateChatFormat(raising, tokenizer, frozenset({0}))


def test_generation_tag_and_sandbox(tokenizer_folders):
    tagged = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
        {},
    )
    assert (
        tagged.render(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], False
        )
        == "ab"
    )
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(ChatTemplateError):
        escape.render([], False)


def test_simple_chat_format():
    tokenizer = builtin_tokenizer()
    chat_format = SimpleChatFormat(tokenizer)
    bos, end, system, user, assistant = (
        tokenizer.token_to_id(t) for t in SimpleChatFormat.SPECIAL_TOKENS
    )
    assert chat_format.start(None) == [bos]
    assert chat_format.start("sé") == [bos, system, *"sé".encode(), end]
    assert chat_format.user_turn("<|end|>") == [user, *b"<|end|>", end, assistant]
    assert chat_format.stop_token_ids == {end}
    assert chat_format.assistant_end([104, 105], "length") == [end]
    assert chat_format.assistant_end([104, end], "stop") == []
    assert chat_format.is_incremental_exact


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_whole_messages_render_as_the_template_does(tokenizer_folders, kind):
    """A history given as messages (OpenAI's routes, app/openai/render.py): user_message and
    assistant_message pieces, then user_turn, equal the template's render of the conversation."""
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folders[kind]
    chat_format = template_format(folder)
    log = list(chat_format.start("You are terse."))
    messages = [{"role": "system", "content": "You are terse."}]
    for user, reply in CONVERSATION:
        messages.append({"role": "user", "content": user})
        if reply is None:
            log += chat_format.user_turn(user)
            break
        log += chat_format.user_message(user) + chat_format.assistant_message(reply)
        messages.append({"role": "assistant", "content": reply})
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert log == expected


def test_simple_chat_format_whole_messages():
    tokenizer = builtin_tokenizer()
    chat_format = SimpleChatFormat(tokenizer)
    _, end, _, user, assistant = (tokenizer.token_to_id(t) for t in SimpleChatFormat.SPECIAL_TOKENS)
    assert chat_format.user_message("hi") == [user, *b"hi", end]
    assert chat_format.assistant_message("yo") == [assistant, *b"yo", end]
    # A generated reply closes to the same tokens: user_turn + generated + assistant_end.
    generated = list(b"yo")
    assert chat_format.user_message("hi") + chat_format.assistant_message("yo") == (
        chat_format.user_turn("hi") + generated + chat_format.assistant_end(generated, "length")
    )
