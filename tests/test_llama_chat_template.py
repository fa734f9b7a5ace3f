"""llama/chat_template.py renders chat templates exactly as transformers' apply_chat_template(tokenize=False), and
BILLA_CHAT_TEMPLATE renders the recipe's format exactly as stage 3 trains on it."""
import jinja2
import pytest

from chat_tokenizers import FEATURES, LLAMA3, QWEN25, SMOLLM2
from llama.chat_template import (BILLA_CHAT_TEMPLATE, chat_template_for_export, render_chat, stored_chat_format,
                                 write_chat_format)
from training.conversation import Chat, ChatRenderer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  北京是哪里？ "},
     {"role": "assistant", "content": "中国的首都。\n"}, {"role": "user", "content": "And Paris?\n\n"},
     {"role": "assistant", "content": "France's capital, \"quoted\" & <tagged>."}],
]


@pytest.mark.parametrize("template", [LLAMA3, QWEN25, SMOLLM2, FEATURES, BILLA_CHAT_TEMPLATE],
                         ids=["llama3", "qwen2.5", "smollm2", "features", "billa"])
@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_render_equals_transformers_apply_chat_template(templated_tokenizers, template, generation_prompt,
                                                        conversation):
    tok, hf = templated_tokenizers("llama3-instruct", template)
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    got = render_chat(template, messages, tok.bos_token, tok.eos_token, generation_prompt)
    assert got == expected


def test_raise_exception_is_a_template_error_as_in_transformers(templated_tokenizers):
    messages = [{"role": "assistant", "content": "x"}]
    tok, hf = templated_tokenizers("llama3-instruct", FEATURES)
    with pytest.raises(jinja2.TemplateError, match="bad first role"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="bad first role"):
        render_chat(FEATURES, messages, tok.bos_token, tok.eos_token)


@pytest.mark.parametrize("chat", [
    Chat("", ((("What is the capital of France?",), "Paris."),)),
    Chat("", ((("Translate into Chinese:", "good morning"), "早上好"),)),
    Chat("Answer briefly.", ((("q1",), "a1"), (("问题二",), "答案二"), (("q3",), None))),
    Chat("", ((("q1",), "a1"), (("q2",), None))),
])
def test_billa_template_renders_exactly_the_training_format(templated_tokenizers, chat):
    for name, bos, eos in (("llama3", "<|begin_of_text|>", "<|end_of_text|>"), ("sentencepiece", "<s>", "</s>")):
        tok, hf = templated_tokenizers(name, BILLA_CHAT_TEMPLATE)
        assert (tok.bos_token, tok.eos_token) == (bos, eos)
        ours = ChatRenderer(tok, "billa").text(chat)
        generation_prompt = chat.turns[-1][1] is None
        assert render_chat(BILLA_CHAT_TEMPLATE, chat.messages(), bos, eos, generation_prompt) == ours
        assert hf.apply_chat_template(chat.messages(), tokenize=False, add_generation_prompt=generation_prompt) == ours
    if not chat.system and len(chat.turns) == 1:  # the recipe's single turn, spelled out
        parts, answer = chat.turns[0]
        assert ours == "</s>".join(["<s>Human: " + "".join(p + "\n" for p in parts) + "Assistant: " + answer, ""])
    if chat.turns[-1][1] is None:  # the generation prompt ends where training's masked part does, at "Assistant:"
        assert ours.endswith("\nAssistant:")


def test_chat_format_file_round_trip_export_template_and_errors(tmp_path):
    assert stored_chat_format(tmp_path) == "billa"  # no file: stages 1 and 2, the recipe's format
    assert chat_template_for_export(tmp_path, QWEN25) == QWEN25  # ... but never trained on it: the source's
    assert chat_template_for_export(tmp_path, None) is None
    write_chat_format(tmp_path, "billa")
    assert chat_template_for_export(tmp_path, QWEN25) == BILLA_CHAT_TEMPLATE
    write_chat_format(tmp_path, "template")
    assert stored_chat_format(tmp_path) == "template"
    assert chat_template_for_export(tmp_path, QWEN25) == QWEN25
    (tmp_path / "chat_format.json").write_text('{"chat_format": "chatml"}')
    with pytest.raises(ValueError, match="chat_format.json: chat_format 'chatml' is not one of"):
        stored_chat_format(tmp_path)
