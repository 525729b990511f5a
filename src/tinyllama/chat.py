"""An interactive terminal chat (`tinyllama chat`) in the TinyLlama-Chat format.

The conversation is rendered with the tokenizer's chat template (TinyLlama-Chat-v1.0:
`<|system|>\\n{system}</s>\\n<|user|>\\n{message}</s>\\n<|assistant|>\\n`), replies stream as they are
generated, and when the conversation no longer fits the context (with room for a reply) the oldest turns
are dropped; the system prompt is always kept. Commands: /reset, /system TEXT, /exit (or Ctrl-D).
"""

from __future__ import annotations

from typing import Iterator, Optional, TextIO

from tinyllama.errors import TinyLlamaError

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt, resets), /exit"


class ChatSession:
    """Conversation state plus generation. `reply(text)` streams the assistant's answer and records it."""

    def __init__(self, model, tokenizer, cfg, system: Optional[str] = None, engine=None) -> None:
        from tinyllama.generate import DecodeEngine

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.system = system or None
        self.turns: list[dict] = []  # user/assistant messages, oldest first
        self.engine = engine or DecodeEngine(model)
        self.dropped = 0  # messages dropped so far to fit the context

    def reset(self, system: Optional[str] = "keep") -> None:
        self.turns = []
        if system != "keep":
            self.system = system or None

    def messages(self, turns: Optional[list[dict]] = None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + (self.turns if turns is None else turns)

    def render(self, turns: Optional[list[dict]] = None) -> str:
        return self.tokenizer.apply_chat_template(self.messages(turns), add_generation_prompt=True)

    def prompt_ids(self) -> list[int]:
        """Token ids of the conversation so far, oldest turns dropped until it fits with room for a reply."""
        ctx = self.model.config.max_seq_len
        room = min(self.cfg.max_new_tokens, ctx // 2)
        alone = self.tokenizer.encode(self.render(self.turns[-1:]), bos=True)
        if len(alone) + room > ctx:  # refuse before dropping any history
            raise TinyLlamaError(
                f"message too long: {len(alone)} tokens with the system prompt, the context is {ctx} "
                f"and {room} are kept for the reply; shorten it or lower --max-new-tokens"
            )
        while True:
            ids = self.tokenizer.encode(self.render(), bos=True)
            if len(ids) + room <= ctx:
                return ids
            # Drop the oldest exchange (a user message and the reply to it).
            n = 2 if len(self.turns) >= 3 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:n]
            self.dropped += n

    def reply(self, text: str) -> Iterator[str]:
        from tinyllama.generate import stream_text

        self.turns.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except TinyLlamaError:
            self.turns.pop()
            raise
        ctx_left = self.model.config.max_seq_len - len(ids)
        cfg = self.cfg.replace(max_new_tokens=min(self.cfg.max_new_tokens, ctx_left),
                               stop=tuple(self.cfg.stop) or ("<|user|>", "<|system|>"))
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, ids, cfg, engine=self.engine):
            if not pieces:
                piece = piece.lstrip(" ")  # the first token's word-start marker, not part of the reply
                if not piece:
                    continue
            pieces.append(piece)
            yield piece
        self.turns.append({"role": "assistant", "content": "".join(pieces).strip()})


def chat_loop(session: ChatSession, inp: TextIO, out: TextIO, interactive: bool) -> int:
    if interactive:
        out.write(f"tinyllama chat — {HELP}\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = inp.readline()
        if not line:  # EOF / Ctrl-D
            if interactive:
                out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        cmd = text.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            out.write("[conversation reset]\n")
            continue
        if cmd.startswith("/system"):
            session.reset(system=cmd[len("/system"):].strip())
            out.write(f"[system prompt set to {session.system!r}; conversation reset]\n")
            continue
        if cmd in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        before = session.dropped
        try:
            for piece in session.reply(text):
                out.write(piece)
                out.flush()
        except TinyLlamaError as e:
            out.write(f"[error: {e}]\n")
            continue
        out.write("\n")
        if session.dropped > before:
            out.write(f"[context full: dropped the {session.dropped - before} oldest message(s)]\n")
        out.flush()
