"""Real-world chat templates and a tiny byte-level BPE tokenizer with chat special tokens, for the chat tests
(not a test module).

BpeTokenizer wraps a transformers PreTrainedTokenizerFast in the names of the tokenizer contract (vocab_size,
bos_id, eos_id, pad_id, bos_token, eos_token, chat_template, model_path, encode, encode_batch, decode). It stands in
for the tokenizer.json kind of llama.load_tokenizer until that is merged; the lead switches these tests to it then.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]

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


def train_bpe(texts: list[str], directory: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer.json (as Llama 3, Qwen and SmolLM2 have) with the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


class BpeTokenizer:
    """A PreTrainedTokenizerFast in the tokenizer contract's names (see the module docstring)."""

    def __init__(self, path: Path, chat_template: str | None, bos_token: str | None = "<|begin_of_text|>",
                 eos_token: str = "<|im_end|>"):
        from transformers import PreTrainedTokenizerFast

        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=bos_token, eos_token=eos_token,
                                          pad_token="<|endoftext|>", chat_template=chat_template)
        self.model_path = Path(path)
        self.vocab_size = len(self.hf)
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.bos_id = None if bos_token is None else self.hf.convert_tokens_to_ids(bos_token)
        self.eos_id = self.hf.convert_tokens_to_ids(eos_token)
        self.pad_id = self.hf.pad_token_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(text, bos, eos) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))

    def token_ends(self, text: str, ids: list[int]) -> np.ndarray:
        offsets = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return np.array([end for _, end in offsets], dtype=np.int64)
