"""Real-world chat templates, and the session's tokenizers saved with one, for the chat tests (not a test module).

TemplatedTokenizers gives, for a tokenizer of the session (tests/conftest.py: the bpe_tokenizer_dirs families and
the SentencePiece tokenizer_path) and a chat template, the pair (llama.load_tokenizer's tokenizer, transformers'
AutoTokenizer) of one dir written by the tokenizer's own save with that template: ours is what training uses, the
transformers one is what it is compared with (apply_chat_template, assistant masks).
"""
from __future__ import annotations

from pathlib import Path

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct's (ChatML with a default system prompt and tool calls).
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# SmolLM2-Instruct's.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Exercises the rest of transformers' environment: the generation tag, raise_exception, tojson, strftime_now,
# loop controls, trim_blocks and lstrip_blocks.
FEATURES = """{% if messages[0]['role'] not in ['system', 'user'] %}{{ raise_exception('bad first role') }}{% endif %}
{{ bos_token }}[{{ strftime_now('%Y') }}]
{% for message in messages %}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | tojson }}{{ eos_token }}{% endgeneration %}
    {% else %}
<{{ message['role'] }}>{{ message['content'] }}
    {% endif %}
    {% if loop.index > 40 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}>>{% endif %}"""


class TemplatedTokenizers:
    """(ours, transformers') tokenizer of sources[name] with a chat template, each pair written once."""

    def __init__(self, sources: dict[str, Path], tmp_path_factory):
        self.sources, self.tmp_path_factory, self.made = sources, tmp_path_factory, {}

    def __call__(self, name: str, template: str):
        if (name, template) not in self.made:
            from transformers import AutoTokenizer

            from llama import load_tokenizer

            directory = self.tmp_path_factory.mktemp(f"chat-{name}")
            load_tokenizer(self.sources[name]).save(directory, chat_template=template)
            self.made[name, template] = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
        return self.made[name, template]
