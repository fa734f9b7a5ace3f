"""Text of a token stream as it comes, safe to print piece by piece.

Decoding token by token breaks multi-byte characters (a Chinese character the vocabulary lacks arrives as 3 byte
tokens) and SentencePiece's leading-space rule. So the whole id list is decoded each time and only the new, stable
part is handed out: a trailing U+FFFD (an incomplete UTF-8 sequence) is held back until its bytes are complete,
and so is a tail that could be the start of a stop text.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class StreamDecoder:
    def __init__(self, tokenizer, stop_texts: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_texts = tuple(s for s in stop_texts if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False  # a stop text appeared: the caller should stop generating
        self._pieces: list[str] = []

    def feed(self, token_id: int) -> str:
        """The new printable text after one more token ('' while held back)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stop_texts:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                self.stopped = True
                return self._emit(text, at)
        end = len(text) - (len(text) - len(text.rstrip(REPLACEMENT)))
        held = max((k for stop in self.stop_texts for k in range(1, len(stop)) if text[:end].endswith(stop[:k])),
                   default=0)
        return self._emit(text, end - held)

    def finish(self) -> str:
        """What is still held back, once generation is over (cut at a stop text)."""
        text = self.tokenizer.decode(self.ids)
        for stop in self.stop_texts:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return self._emit(text, len(text))

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        return "".join(self._pieces)

    def _emit(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = text[self.emitted:end]
        self.emitted = end
        self._pieces.append(piece)
        return piece
