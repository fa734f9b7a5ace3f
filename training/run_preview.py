"""What a run will train on, in its first log lines: the end token, bos and chat format; a warning where an Instruct
base's end token and chat template disagree; and the first sample of each set, rendered with its counted part marked
(preview_samples), as LLaMA-Factory previews its first example.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from llama.chat_template import render_chat
from llama.tokenizer import Tokenizer
from training.corpus import RecordError, parse_record, read_first_lines
from training.record_rules import CHECK_LINES
from training.samples import SampleBuilder, counted_spans

COUNTED = ("⟦", "⟧")  # around the tokens the loss counts, in a preview
PREVIEW_CHARS = 1200  # of each masked or counted stretch; a longer one loses its middle
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # how bases name the end of a document
_TOKEN_TEXT = re.compile(r"<[^<>\s]{1,40}>")  # special-token texts a chat template writes ("<|im_start|>")


def tokens_line(tokenizer: Tokenizer, settings) -> str:
    """bos, the end token (where it comes from) and what this stage ends with it; the chat format in stage 3."""
    bos = f"{tokenizer.bos_token} (id {tokenizer.bos_id})" if tokenizer.bos_id is not None else "none added"
    source = "eos_token setting" if settings.model.eos_token else "the tokenizer's eos"
    line = f"tokens: bos {bos} | end token {tokenizer.eos_token} (id {tokenizer.eos_id}, {source})"
    if settings.chat is not None:
        return f"{line} ends every answer | chat format {settings.chat.chat_format}"
    return f"{line} ends every document and answer"


def template_turn_end(tokenizer: Tokenizer) -> str | None:
    """The text the tokenizer's chat template writes right after an answer (its turn end: "<|im_end|>",
    "<|eot_id|>"); None without a template or where nothing follows."""
    if not tokenizer.chat_template:
        return None
    marker = "ANSWER-7f3a"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    try:
        text = render_chat(tokenizer.chat_template, messages, tokenizer.bos_token, tokenizer.eos_token)
    except Exception:  # noqa: BLE001 - a template that cannot render is reported where it is used (stage 3)
        return None
    after = text[text.find(marker) + len(marker):].split() if marker in text else []
    return after[0] if after else None


def end_token_warning(tokenizer: Tokenizer, settings) -> str | None:
    """Where eos_token is unset and the tokenizer's chat template says its eos is not the end this stage needs: in
    stages 1-2 an eos that ends the template's turns (an Instruct base: every document would end with its turn
    end); in stage 3 a template whose turns end with another token than the eos. None otherwise."""
    if settings.model.eos_token:
        return None
    turn_end = template_turn_end(tokenizer)
    if turn_end is None:
        return None
    eos = tokenizer.eos_token
    stage_3 = settings.chat is not None
    if not stage_3 and turn_end.startswith(eos):
        other = next((name for name in END_OF_TEXT_NAMES if name != eos and tokenizer.token_to_id(name) is not None),
                     None)
        return (f"the end token {eos} is the turn end of the tokenizer's chat template (an Instruct base): every "
                f"document of this stage will end with it; set eos_token to the base's end of text"
                + (f" (eos_token={other})" if other else ""))
    if stage_3 and not turn_end.startswith(eos):
        return (f"the tokenizer's chat template ends each turn with {turn_end}, but answers will end with the end "
                f"token {eos}; set eos_token={turn_end} for answers to end as the template's turns do")
    return None


def preview_lines(data, tokenizer: Tokenizer) -> list[str]:
    """The first usable record of each set (rank 0's first file), as the stream builds it: its ids written out as
    text, the counted ones between ⟦ ⟧. Read apart from the stream (its position and counters stay as they are)."""
    rules = type(data.rules)(data.root, data.split)  # without the stream's note: nothing counted
    builder = SampleBuilder(tokenizer, data.max_seq_length, data.long_text, data.long_prompt,
                            data.builder.chats.chat_format)
    spell = _speller(tokenizer)
    lines = []
    for name, reader in data.readers.items():
        found = _first_spec(rules, name, reader.files)
        if found is None:
            lines.append(f"preview: set '{name}': no usable record in the first {CHECK_LINES} lines of its files")
            continue
        where, spec = found
        samples = builder.build([spec], random.Random(0), Counter())[0]
        if not samples:
            lines.append(f"preview: set '{name}', {where}: too long for max_seq_length={data.max_seq_length}")
            continue
        sample = samples[0]
        spans = counted_spans(sample)
        text, position = "", 0
        for start, stop in spans:
            text += _shortened(spell(sample.ids[position:start])) + COUNTED[0]
            text += _shortened(spell(sample.ids[start:stop])) + COUNTED[1]
            position = stop
        text += _shortened(spell(sample.ids[position:]))
        counted = sum(stop - start for start, stop in spans)
        more = f", the first of {len(samples)} samples" if len(samples) > 1 else ""
        lines.append(f"preview: set '{name}', {where}: {len(sample.ids)} tokens, {counted} in the loss (between "
                     f"{COUNTED[0]} {COUNTED[1]}){more}:\n{text}")
    return lines


def _first_spec(rules, name: str, files) -> tuple[str, object] | None:
    for path in files:
        for number, raw in read_first_lines(path, CHECK_LINES, name):
            try:
                spec = rules.build(name, parse_record(raw), random.Random(0)) if raw.strip() else None
            except RecordError:
                continue
            if spec is not None:
                return f"{path.name} line {number}", spec
    return None


def _speller(tokenizer: Tokenizer):
    """ids -> their text, special tokens written as their names (bos, eos, and those the chat template writes)."""
    table = tokenizer.token_bytes()
    names = {tokenizer.eos_id: tokenizer.eos_token}
    if tokenizer.bos_id is not None:
        names[tokenizer.bos_id] = tokenizer.bos_token
    for text in _TOKEN_TEXT.findall(tokenizer.chat_template or ""):
        token = tokenizer.token_to_id(text)
        if token is not None and token < len(table) and not table[token]:
            names.setdefault(token, text)

    def spell(ids: list[int]) -> str:
        out, pending = [], b""
        for token in ids:
            if token in names:
                out += [pending.decode("utf-8", errors="replace"), names[token]]
                pending = b""
            else:
                pending += table[token] if token < len(table) else b""
        return "".join(out) + pending.decode("utf-8", errors="replace")

    return spell


def _shortened(text: str) -> str:
    if len(text) <= PREVIEW_CHARS:
        return text
    half = PREVIEW_CHARS // 2
    return f"{text[:half]} [... {len(text) - 2 * half:,} characters ...] {text[-half:]}"
