"""Talk to a model dir in the chat format it was trained in (stage 3's), with the answer streamed.

    python -m tools.chat --model outputs/alignment_sft/final                  # interactive
    python -m tools.chat --model DIR --prompt "用一句话介绍北京" --temperature 0   # one answer, greedy

The format is the one stored with the model dir (chat_format.json, written by stage 3): "billa", the recipe's
"Human: ...\\nAssistant: " with each earlier answer ended by the end token, or "template", the tokenizer's chat
template; a dir without the file (stages 1 and 2) is "billa". The prompt is built exactly as training renders a
conversation (tools/chat_format.py). Interactive commands: /reset forgets the conversation, /exit (or Ctrl-D)
quits. Earlier turns are kept in the prompt as long as they fit in the model's context with room for
--max-new-tokens; the oldest whole turns are dropped first, as training drops them. Temperature 0 is greedy and
deterministic; otherwise --seed fixes the draws.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from llama.chat_template import stored_chat_format
from llama.generation import stream
from llama.pretrained import DTYPES, load_pretrained
from tools.chat_format import MessageTooLong, fit_prompt, prompt_budget, reply_answer, stop_texts
from tools.stream_decode import StreamDecoder
from training.conversation import ChatRenderer



class ChatSession:
    """A conversation with one model: reply() answers and remembers the turn."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9,
                 seed: int = 0, chat_format: str = "billa", system: str = ""):
        self.model, self.tokenizer = model, tokenizer
        # A DataError (a ValueError) for chat_format="template" and a tokenizer without a template.
        self.renderer = ChatRenderer(tokenizer, chat_format)
        self.stop_texts = stop_texts(chat_format)
        self.system = system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.history: list[tuple[str, str]] = []
        device = model.output.weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.budget = prompt_budget(model.config.max_sequence_length, max_new_tokens)
        self.dropped_turns = 0  # oldest turns left out of the last prompt

    def reply(self, message: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        """The answer to `message`, handing each printable piece to on_text as it is generated."""
        prompt_ids, self.dropped_turns = fit_prompt(self.renderer, self.history, message, self.budget, self.system)
        decoder = StreamDecoder(self.tokenizer, self.stop_texts)
        tokens = stream(self.model, prompt_ids, self.max_new_tokens, self.temperature, self.top_p,
                        eos_id=self.tokenizer.eos_id, generator=self.generator)
        try:
            for token_id in tokens:
                piece = decoder.feed(token_id)
                if piece and on_text:
                    on_text(piece)
                if decoder.stopped:
                    break
        finally:
            tokens.close()  # puts the model back in its mode even when stopped early
        piece = decoder.finish()
        if piece and on_text:
            on_text(piece)
        answer = reply_answer(decoder.text, self.renderer.chat_format)
        self.history.append((message, answer))
        return answer

    def reset(self) -> None:
        self.history = []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model dir (config.json, weights, tokenizer.model)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the model dir's)")
    p.add_argument("--prompt", help="answer this once and exit (default: interactive)")
    p.add_argument("--system", default="", help="a system turn before the conversation (kept when turns are dropped)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy, deterministic")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if not 0.0 < args.top_p <= 1.0:
        p.error("--top-p must be in (0, 1]")
    return args


def load_session(args: argparse.Namespace) -> ChatSession:
    model, tokenizer = load_pretrained(args.model, DTYPES[args.dtype], args.device, args.tokenizer)
    return ChatSession(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                       stored_chat_format(args.model), args.system)


def answer(session: ChatSession, message: str, out) -> None:
    out.write("Assistant: ")
    out.flush()

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        session.reply(message, show)
    except MessageTooLong as e:
        out.write(f"[not sent: {e}]")
    out.write("\n")
    if session.dropped_turns:
        out.write(f"[{session.dropped_turns} oldest turn(s) left out to fit the context]\n")
    out.flush()


def main(argv: list[str] | None = None, out=None) -> int:
    args = parse_args(argv)
    out = out or sys.stdout
    try:
        session = load_session(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"chat: {e}", file=sys.stderr)
        return 1
    if args.prompt is not None:
        answer(session, args.prompt, out)
        return 0
    out.write("Chat with the model. /reset forgets the conversation, /exit quits.\n")
    while True:
        try:
            message = input("Human: ")
        except EOFError:
            out.write("\n")
            return 0
        command = message.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            out.write("[conversation forgotten]\n")
            continue
        answer(session, message, out)


if __name__ == "__main__":
    sys.exit(main())
