"""The transformers files beside a tokenizer file, which both tokenizer kinds read and write the same way:
tokenizer_config.json (the bos/eos tokens, the chat template) and special_tokens_map.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama.model_files import SPECIAL_TOKENS_MAP_NAME, TOKENIZER_CONFIG_NAME, read_json_object

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions keep the template instead


def read_tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json of `directory` ({} when there is none), with its chat template as a string."""
    path = directory / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return {}
    config = read_json_object(path)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: transformers uses the one named "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if template is not None:
        config["chat_template"] = template
    return config


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict {"content": ...} or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def end_token_id(tokenizer_path: Path, eos_token: str, config: dict, token_to_id,
                 default: str | None) -> tuple[int, int]:
    """(own eos id, end token id): the tokenizer's eos (tokenizer_config.json's eos_token, else `default`) and the
    one the eos_token setting names instead, if any. token_to_id(text) is the id, or None when text is no token."""
    own = token_text(config.get("eos_token")) or default
    if own is None:
        raise ValueError(f"{tokenizer_path}: the tokenizer names no eos token ({TOKENIZER_CONFIG_NAME} beside it has "
                         f"no eos_token); set eos_token to the token that ends a document")
    own_id = token_to_id(own)
    if own_id is None:
        raise ValueError(f"{tokenizer_path.parent / TOKENIZER_CONFIG_NAME}: eos_token {own!r} is not in the vocabulary "
                         f"of {tokenizer_path}")
    if not eos_token:
        return own_id, own_id
    end_id = token_to_id(eos_token)
    if end_id is None:
        raise ValueError(f"setting eos_token={eos_token!r} is not a token of {tokenizer_path}; leave it empty for the "
                         f"tokenizer's own eos {own!r}")
    return own_id, end_id


def copy_tokenizer_file(source: Path, target: Path) -> None:
    """A tokenizer file copied byte for byte to target (its dir made if missing); nothing to do when saving in
    place (target is source)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != source.resolve():
        shutil.copyfile(source, target)


def write_tokenizer_config(directory: Path, config: dict, tokens: dict[str, str | None],
                           chat_template: str | None) -> None:
    """tokenizer_config.json (`config` with the special tokens and chat template set) and special_tokens_map.json,
    the files transformers' AutoTokenizer.from_pretrained reads beside the tokenizer file."""
    config = {**config, **tokens}  # null stays null: Qwen's bos_token
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    special = {key: text for key, text in tokens.items() if text is not None}
    (directory / SPECIAL_TOKENS_MAP_NAME).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
