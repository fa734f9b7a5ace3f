"""Continued BPE training for a byte-level BPE `tokenizer.json` (Llama 3, Qwen, SmolLM2): new merges learned on
Chinese text, appended after the old ones, and where a new token's embedding starts from.

The `tokenizers` library trains a BPE only from scratch, so the continuation is done here:
1. The text goes through the tokenizer's own normalizer and pre_tokenizer (words in the byte-level alphabet) and
   each distinct word through the existing model: its current segmentation, exactly as the tokenizer encodes it.
2. Adjacent pairs are counted, weighted by word frequency; the most frequent pair is merged into a new token,
   appended to the vocab (ids after the highest existing id, added tokens included) and to the merges (ranks after
   every old merge). Only the words holding the pair are re-segmented and their pairs' counts adjusted, so each
   merge costs the length of the words it touches, not a recount of the corpus.
3. Every new token is the merge of two tokens already in the vocab (old or learned earlier), so all intermediate
   tokens a new token needs are themselves new tokens: each is reachable by the BPE.

Why old text keeps its tokens: BPE applies merges in rank order and every new merge ranks after every old one, so
new merges act only on the segmentation the old merges leave. And a new merge is only learned when the token it
makes holds a byte that starts a CJK character (ZH_LEAD_BYTES): a text with no character in U+3000-U+9FFF or
U+F000-U+FFFF (English, code, Latin punctuation such as curly quotes and dashes) never holds such a pair, so it
tokenizes to exactly the ids it had.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer

from llama.model_files import read_json_object
from llama.tokenizer_json import BYTE_CHAR, CHAR_BYTE, has_byte_level
# UTF-8 lead bytes of U+3000-U+9FFF (CJK punctuation, kana, CJK ideographs: 0xE3-0xE9) and U+F000-U+FFFF
# (compatibility ideographs, fullwidth forms such as "，" and "："; 0xEF). A new token must hold one of them.
ZH_LEAD_BYTES = (*range(0xE3, 0xEA), 0xEF)
ZH_LEAD_CHARS = frozenset(BYTE_CHAR[b] for b in ZH_LEAD_BYTES)


@dataclass
class BpeTokenizer:
    """A byte-level BPE tokenizer.json: the parsed JSON (to write back) and the loaded tokenizer (to encode)."""
    path: Path
    spec: dict
    tokenizer: Tokenizer

    @property
    def vocab(self) -> dict[str, int]:
        return self.spec["model"]["vocab"]

    def next_id(self) -> int:
        """The first free id: after the BPE vocab and after every added token (Llama 3's sit above its vocab)."""
        ids = [*self.vocab.values(), *(t["id"] for t in self.spec.get("added_tokens") or [])]
        return max(ids) + 1

    def words(self, texts: Iterable[str]) -> Counter:
        """Pre-tokenized words of `texts` (normalized, in the byte-level alphabet) with their frequencies."""
        normalizer, pre_tokenizer = self.tokenizer.normalizer, self.tokenizer.pre_tokenizer
        counts: Counter = Counter()
        for text in texts:
            if normalizer is not None:
                text = normalizer.normalize_str(text)
            counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
        return counts

    def segment(self, word: str) -> list[str]:
        """The tokens the model (no pre-tokenization) splits a byte-level string into."""
        return [t.value for t in self.tokenizer.model.tokenize(word)]


def load_bpe(path: str | Path) -> BpeTokenizer:
    """A byte-level BPE tokenizer.json; ValueError naming the file for any other kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    spec = read_json_object(path)  # ValueError naming the file and line
    try:
        tokenizer = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # noqa: BLE001 -- the Rust parser raises a bare Exception
        raise ValueError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; vocabulary expansion of a tokenizer.json needs "
                         f"a byte-level BPE (a SentencePiece tokenizer.model is expanded through its own path)")
    if not has_byte_level(spec.get("pre_tokenizer")):
        raise ValueError(f"{path}: the pre_tokenizer has no ByteLevel step; only byte-level BPE tokenizers "
                         f"(Llama 3, Qwen, SmolLM2, GPT-2) can be expanded from a tokenizer.json")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: BPE {key}={model[key]!r} is not supported (byte-level BPEs have none)")
    return BpeTokenizer(path, spec, tokenizer)


@dataclass
class LearnedMerges:
    merges: list[tuple[str, str]]  # in rank order, after every old merge
    new_tokens: list[str]  # in id order from BpeTokenizer.next_id(); one per merge
    words: int  # distinct words holding a CJK lead byte that were learned from
    last_count: int  # frequency of the last merged pair (0 when none)


def _pairs(symbols: list[str]) -> Counter:
    return Counter(zip(symbols, symbols[1:]))


def _merge_word(symbols: list[str], a: str, b: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(base: BpeTokenizer, texts: Iterable[str], max_new: int, min_frequency: int = 2) -> LearnedMerges:
    """Up to `max_new` new merges learned on `texts`, continuing `base`'s BPE; stops early when the best allowed
    pair occurs fewer than `min_frequency` times."""
    vocab = set(base.vocab)
    word_counts = base.words(texts)
    words, freqs = [], []
    for word, freq in word_counts.items():
        if ZH_LEAD_CHARS.intersection(word):  # other words hold no pair a new merge may join
            words.append(base.segment(word))
            freqs.append(freq)

    counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for w, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair, n in _pairs(symbols).items():
            counts[pair] += n * freq
            where.setdefault(pair, set()).add(w)

    def allowed(pair: tuple[str, str]) -> bool:
        merged = pair[0] + pair[1]
        return merged not in vocab and not ZH_LEAD_CHARS.isdisjoint(merged)

    # Max-heap by count, ties broken by the pair's text (deterministic). Entries go stale when a count changes;
    # the changed pair is pushed again, and a popped entry is used only if its count is still current.
    heap = [(-n, pair) for pair, n in counts.items() if allowed(pair)]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    last = 0
    while heap and len(merges) < max_new:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or not allowed(pair):
            continue
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b
        merges.append(pair)
        vocab.add(merged)
        last = -neg
        changed = set()
        for w in where.pop(pair):
            old = words[w]
            new = _merge_word(old, a, b)
            old_pairs, new_pairs, freq = _pairs(old), _pairs(new), freqs[w]
            for p in old_pairs.keys() | new_pairs.keys():
                delta = new_pairs.get(p, 0) - old_pairs.get(p, 0)
                if delta:
                    counts[p] += delta * freq
                    changed.add(p)
                if p not in new_pairs:
                    where.get(p, set()).discard(w)  # the merged pair's own set is already gone
                elif p not in old_pairs:
                    where.setdefault(p, set()).add(w)
            words[w] = new
        del counts[pair]
        changed.discard(pair)
        for p in changed:
            if counts[p] > 0 and allowed(p):
                heapq.heappush(heap, (-counts[p], p))
    return LearnedMerges(merges, [a + b for a, b in merges], len(words), last)


def expanded_spec(base: BpeTokenizer, learned: LearnedMerges) -> dict:
    """base's tokenizer.json with the new tokens after its highest id and the new merges after its last merge, in
    the merges format the file already uses ("a b" strings or [a, b] lists)."""
    spec = json.loads(json.dumps(base.spec))  # a deep copy
    model = spec["model"]
    first = base.next_id()
    # On load the tokenizers library gives an added token that the model's vocab lacks the next id after the vocab
    # (AddedVocabulary::add_tokens), whatever id the file names: right while the specials sit just past the vocab
    # (Llama 3, Qwen2), but new tokens now follow them, and <|im_end|> would become a new token's id. Listed in the
    # vocab as well (as GPT-2's file lists <|endoftext|>), each keeps its id; the BPE model never produces them, since
    # added tokens are split off before it runs.
    taken = set(model["vocab"].values())
    for added in spec.get("added_tokens") or []:
        if added["content"] not in model["vocab"] and added["id"] not in taken:
            model["vocab"][added["content"]] = added["id"]
    for i, token in enumerate(learned.new_tokens):
        model["vocab"][token] = first + i
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"].extend(f"{a} {b}" if as_strings else [a, b] for a, b in learned.merges)
    return spec


def write_tokenizer(spec: dict, path: str | Path) -> Tokenizer:
    """Write the tokenizer.json (through a temp name) and return it loaded, so a file the library cannot read is
    never left behind."""
    path = Path(path)
    text = json.dumps(spec, ensure_ascii=False, indent=2)
    tokenizer = Tokenizer.from_str(text)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return tokenizer


def old_ids_of(base: BpeTokenizer, token: str) -> list[int]:
    """Old-vocabulary ids the base model splits a new token's bytes into (its embedding starts as their mean)."""
    return [t.id for t in base.tokenizer.model.tokenize(token)]


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for."""
    return bytes(CHAR_BYTE[c] for c in token)


def encode_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's bos/eos (what tokens per character counts)."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
