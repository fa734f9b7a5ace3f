"""Chat templates: a Jinja chat template rendered exactly as transformers' `apply_chat_template(tokenize=False)`
renders it, the recipe's "Human: ...\\nAssistant: " format as such a template, and the chat format stored with a
model dir.

Rendering follows transformers 4.51.3 (transformers/utils/chat_template_utils.py, _compile_jinja_template and
tokenization_utils_base.PreTrainedTokenizerBase.apply_chat_template): an ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension and the `{% generation %}` tag (its body is rendered as
is), a tojson filter that does not escape HTML and keeps non-ASCII text, and the globals raise_exception and
strftime_now. The template sees messages, add_generation_prompt, tools=None, documents=None, the special tokens
(bos_token, eos_token) and any extra keyword.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama.model_files import read_json_object

CHAT_FORMAT_FILE = "chat_format.json"  # written into a stage-3 model dir: {"chat_format": "billa" | "template"}
CHAT_FORMATS = ("billa", "template")

# The recipe's format (alignment_sft_main.py) as a chat template, for transformers, vLLM and llama.cpp to render a
# model trained with chat_format="billa". Each answer is followed by the end token and nothing else; the next
# question follows it directly; a system turn is its text and one "\n" before the first question:
#     <bos>[system\n]Human: q1\nAssistant: a1<eos>Human: q2\nAssistant: a2<eos>
# The generation prompt is "Assistant:" without the space: training counts the space with the answer, since
# tokenizers join it to the answer's first word (training.conversation.billa_question).
# System and user texts are stripped, as the recipe strips its fields; an answer loses its trailing whitespace and
# leading line breaks only, so that code keeps its indentation (training.conversation.answer_text). Rendered, it
# equals training.conversation's billa rendering character for character (tests/test_llama_chat_template.py).
BILLA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] | trim + '\n' }}"
    "{% else %}{% generation %}{{ 'Assistant: ' + message['content'].rstrip().lstrip('\\r\\n') + eos_token }}"
    "{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %} ... {% endgeneration %}` (AssistantTracker): marks assistant text for
    return_assistant_tokens_mask; rendering outputs the body unchanged, which is all apply_chat_template does with it
    when no mask is asked for."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a stream renders every record with the same one). A syntax error is a
    jinja2.TemplateSyntaxError."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], bos_token: str | None = None, eos_token: str | None = None,
                add_generation_prompt: bool = False, **kwargs) -> str:
    """The conversation as text, as apply_chat_template(messages, tokenize=False, add_generation_prompt=...) gives
    it for a tokenizer with these bos/eos tokens. A None token is left undefined, as transformers leaves a special
    token the tokenizer does not have. A template's raise_exception() raises jinja2.TemplateError."""
    special = {name: value for name, value in (("bos_token", bos_token), ("eos_token", eos_token))
               if value is not None}
    return compile_template(template).render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **{**special, **kwargs})


def stored_chat_format(model_dir: str | Path) -> str:
    """The chat format a model dir was trained with (its chat_format.json); "billa", the recipe's, when the dir has
    none (stages 1 and 2, or a dir from elsewhere). ValueError naming the file when it is unreadable or unknown."""
    path = Path(model_dir) / CHAT_FORMAT_FILE
    if not path.is_file():
        return "billa"
    value = read_json_object(path).get("chat_format")  # ValueError naming the file and line if it is no object
    if value not in CHAT_FORMATS:
        raise ValueError(f"{path}: chat_format {value!r} is not one of {CHAT_FORMATS}")
    return value


def write_chat_format(model_dir: str | Path, chat_format: str) -> None:
    """Record the chat format with a model dir (tools.chat and tools.eval_ppl follow it; to_hf writes
    BILLA_CHAT_TEMPLATE into tokenizer_config.json for "billa")."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format {chat_format!r} is not one of {CHAT_FORMATS}")
    (Path(model_dir) / CHAT_FORMAT_FILE).write_text(json.dumps({"chat_format": chat_format}) + "\n",
                                                     encoding="utf-8")


def chat_template_for_export(model_dir: str | Path, source_template: str | None) -> str | None:
    """The chat template to_hf writes into tokenizer_config.json: BILLA_CHAT_TEMPLATE for a model stage 3 trained
    with chat_format="billa", else the tokenizer's own (source_template; None when it has none). A dir without
    chat_format.json (stages 1 and 2, a converted base) keeps the source's: it was not trained on any format."""
    if not (Path(model_dir) / CHAT_FORMAT_FILE).is_file():
        return source_template
    return BILLA_CHAT_TEMPLATE if stored_chat_format(model_dir) == "billa" else source_template
