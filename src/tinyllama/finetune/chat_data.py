"""Chat data for fine-tuning: JSONL readers with line-numbered errors, chat-template rendering with an
assistant-only loss mask, and packing into fixed-length training blocks.

SFT lines are `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (the
UltraChat / OpenAI shape), Alpaca's `{"instruction", "input", "output"}` (optional "system"), or ShareGPT's
`{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}` (also "user"/"assistant"); the
first record decides a file's shape and every other record must have it. DPO lines are
`{"prompt", "chosen", "rejected"}` where `prompt` is a string or a message list and `chosen`/`rejected` are
strings (the reply) or full message lists ending in the reply (UltraFeedback-binarized).

Rendering uses the tokenizer's chat template (TinyLlama-Chat's Zephyr template by default), tokenises the
whole conversation once and marks a token trainable when it lies inside an assistant message's content
or its end-of-turn marker (`</s>`), so the model learns to answer and to stop, never to write the user's turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tinyllama.data.readers import read_jsonl_objects
from tinyllama.errors import TinyLlamaError

ROLES = ("system", "user", "assistant")
IGNORE = -100


# ---- reading ---------------------------------------------------------------------------------------
def check_messages(messages, where: str, field: str = "messages", keys: tuple[str, str] = ("role", "content"),
                   roles: Optional[dict] = None) -> list[dict]:
    """Validated {role, content} messages. keys: the names of a turn's role and text fields in the data;
    roles: the data's role names -> ours (default: ours, as they are)."""
    role_key, text_key = keys
    roles = roles or {r: r for r in ROLES}
    if not isinstance(messages, list):
        raise TinyLlamaError(f"{where}: field '{field}' must be a list of {{{role_key}, {text_key}}} objects")
    if not messages:
        raise TinyLlamaError(f"{where}: field '{field}' is an empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TinyLlamaError(f"{where}: {field}[{i}] must be an object with '{role_key}' and '{text_key}'")
        for key in keys:
            if key not in m:
                raise TinyLlamaError(f"{where}: {field}[{i}] is missing field '{key}'")
        if not isinstance(m[role_key], str) or m[role_key] not in roles:
            raise TinyLlamaError(f"{where}: {field}[{i}] has unknown role {m[role_key]!r}; roles are "
                                 f"{', '.join(roles)}")
        if not isinstance(m[text_key], str):
            raise TinyLlamaError(f"{where}: {field}[{i}] field '{text_key}' must be a string")
        out.append({"role": roles[m[role_key]], "content": m[text_key]})
    return out


# Which record shape a key marks, in order of precedence (a record with "messages" is OpenAI-shaped even if
# it also has, say, an "instruction" field).
SHAPES = {"messages": "messages", "conversations": "ShareGPT", "instruction": "Alpaca"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def record_shape(rec: dict) -> Optional[str]:
    return next((shape for key, shape in SHAPES.items() if key in rec), None)


def _string_field(rec: dict, key: str, where: str, required: bool = True) -> str:
    v = rec.get(key, "")
    if key not in rec and required:
        raise TinyLlamaError(f"{where}: missing field '{key}'")
    if not isinstance(v, str):
        raise TinyLlamaError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def alpaca_messages(rec: dict, where: str) -> list[dict]:
    """Alpaca's instruction (+ input, as a second paragraph) is the user turn, output the reply."""
    instruction = _string_field(rec, "instruction", where)
    if not instruction.strip():
        raise TinyLlamaError(f"{where}: field 'instruction' is empty")
    extra, output = _string_field(rec, "input", where, required=False), _string_field(rec, "output", where)
    system = _string_field(rec, "system", where, required=False)
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def read_chat_jsonl(path, limit: Optional[int] = None) -> list[list[dict]]:
    """Conversations (message lists) from an OpenAI-messages, Alpaca or ShareGPT JSONL file."""
    convs = []
    shape, shape_line = None, 0
    for lineno, rec in read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        this = record_shape(rec)
        if this is None:
            key = {v: k for k, v in SHAPES.items()}.get(shape)
            raise TinyLlamaError(f"{where}: missing field '{key}'" if shape else
                                 f"{where}: missing field 'messages' (or Alpaca's 'instruction'/'output', or "
                                 f"ShareGPT's 'conversations')")
        if shape is None:
            shape, shape_line = this, lineno
        elif this != shape:
            raise TinyLlamaError(f"{where}: a {this} record in a file of {shape} records (line {shape_line} is "
                                 f"one); use one shape per file")
        if shape == "messages":
            msgs = check_messages(rec["messages"], where)
        elif shape == "ShareGPT":
            msgs = check_messages(rec["conversations"], where, "conversations", ("from", "value"), SHAREGPT_ROLES)
        else:
            msgs = alpaca_messages(rec, where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise TinyLlamaError(f"{where}: conversation has no assistant message: nothing to learn from")
        convs.append(msgs)
        if limit is not None and len(convs) >= limit:
            break
    if not convs:
        raise TinyLlamaError(f"{path}: no conversations")
    return convs


def read_preference_jsonl(path, limit: Optional[int] = None) -> list[tuple[list[dict], list[dict]]]:
    """(chosen conversation, rejected conversation) pairs; each ends with the assistant reply that is judged."""
    pairs = []
    for lineno, rec in read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in rec:
                raise TinyLlamaError(f"{where}: missing field '{key}'")
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise TinyLlamaError(f"{where}: field 'prompt' is empty")
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            prompt_msgs = check_messages(prompt, where, "prompt")
        convs = []
        for key in ("chosen", "rejected"):
            v = rec[key]
            if isinstance(v, str):
                conv = prompt_msgs + [{"role": "assistant", "content": v}]
            else:
                conv = check_messages(v, where, key)
                if len(conv) == 1:  # just the reply
                    conv = prompt_msgs + conv
            if conv[-1]["role"] != "assistant":
                raise TinyLlamaError(f"{where}: field '{key}' must end with an assistant message")
            convs.append(conv)
        pairs.append((convs[0], convs[1]))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise TinyLlamaError(f"{path}: no preference pairs")
    return pairs


# ---- rendering -------------------------------------------------------------------------------------
def render_chat(tokenizer, messages: Sequence[dict], train_on: str = "all") -> tuple[list[int], list[bool]]:
    """BOS + the templated conversation as ids, and for each id whether the loss covers it.

    train_on: "all" = every assistant message, "last" = only the final one (DPO's judged reply).
    """
    text = ""
    spans = []  # character spans of trainable text
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i, m in enumerate(messages):
        try:
            full = tokenizer.apply_chat_template(list(messages[: i + 1]), add_generation_prompt=False)
        except Exception as e:  # jinja2 errors, or the template's own raise_exception(...)
            raise TinyLlamaError(f"the chat template cannot render the first {i + 1} message(s) of a conversation "
                                 f"({type(e).__name__}: {str(e)[:200]}); fine-tuning renders turn by turn to mask "
                                 f"the loss, so the template must accept every prefix") from None
        if not full.startswith(text):
            raise TinyLlamaError("chat template does not render conversations incrementally; cannot mask by message")
        piece = full[len(text):]
        if m["role"] == "assistant" and (train_on == "all" or i == assistant_idx[-1]):
            at = piece.find(m["content"]) if m["content"] else -1
            start = len(text) + (at if at >= 0 else len(piece) - len(piece.lstrip()))
            # The content and the template's end-of-turn marker after it (trailing whitespace excluded).
            end = len(text) + len(piece.rstrip())
            spans.append((start, end))
        text = full
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [any(s <= a < e for s, e in spans) for a, _ in offsets]
    return [tokenizer.bos_id] + ids, [False] + mask


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]


def tokenize_conversations(tokenizer, convs: Sequence[list[dict]], max_len: int) -> tuple[list[Example], int]:
    """Render each conversation; keep its first max_len+1 tokens. Returns (examples, number truncated)."""
    out, truncated = [], 0
    for conv in convs:
        ids, mask = render_chat(tokenizer, conv)
        if len(ids) > max_len + 1:
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            truncated += 1
        if any(mask[1:]):
            out.append(Example(ids, mask))
    return out, truncated


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int, packing: bool = True) -> torch.Tensor:
    """Blocks of (inputs, targets) as an int32 (N, 2, seq_len) tensor; targets are IGNORE off assistant tokens.

    With packing, whole conversations are placed one after another (first fit, in order) until the next
    would overflow; a conversation is never split. As in TRL's packing (how TinyLlama-Chat was trained),
    attention is causal over the whole block, so a conversation may see the one before it; each starts
    with BOS. Without packing, one conversation per block.
    """
    blocks, cur_ids, cur_mask = [], [], []

    def flush():
        if not cur_ids:
            return
        ids = cur_ids + [pad_id] * (seq_len + 1 - len(cur_ids))
        mask = cur_mask + [False] * (seq_len + 1 - len(cur_mask))
        # int32 halves the memory of a large chat set held in RAM; batches are widened to int64.
        inp = torch.tensor(ids[:-1], dtype=torch.int32)
        tgt = torch.tensor(ids[1:], dtype=torch.int32)
        tgt[~torch.tensor(mask[1:], dtype=torch.bool)] = IGNORE
        blocks.append(torch.stack([inp, tgt]))

    for ex in examples:
        if cur_ids and (not packing or len(cur_ids) + len(ex.ids) > seq_len + 1):
            flush()
            cur_ids, cur_mask = [], []
        # Within a pack the next conversation's BOS is predicted from the previous end: never trained.
        cur_ids += ex.ids
        cur_mask += ex.mask
    flush()
    if not blocks:
        raise TinyLlamaError("no training blocks: every conversation was empty of assistant tokens")
    return torch.stack(blocks)


class BlockLoader:
    """Micro-batches of blocks, reshuffled each epoch from a seed; `state_dict` makes resume exact.

    Each rank takes every world_size-th block of the epoch's order, so ranks never see the same block.
    """

    def __init__(self, blocks: torch.Tensor, micro_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.blocks, self.micro_batch, self.seed = blocks, micro_batch, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.blocks)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        # Every rank gets the same number per epoch (the shuffled remainder waits for the next epoch).
        usable = max(self.world_size, len(order) // self.world_size * self.world_size)
        order = (order * self.world_size)[:usable] if len(order) < self.world_size else order[:usable]
        return order[self.rank:: self.world_size]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        idx = []
        while len(idx) < self.micro_batch:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._make_order()
            idx.append(self._order[self.pos])
            self.pos += 1
        return self.blocks[idx]

    def state_dict(self) -> dict:
        # Positions are kept in global items (all ranks advance together), so a run may resume on
        # another number of processes and still continue the same sequence of global batches.
        return {"epoch": self.epoch, "consumed": self.pos * self.world_size, "seed": self.seed,
                "num_blocks": len(self.blocks)}

    def load_state_dict(self, s: dict) -> None:
        if s.get("num_blocks") != len(self.blocks):
            raise TinyLlamaError(f"cannot resume: the checkpoint saw {s.get('num_blocks')} training blocks, the data "
                                 f"now gives {len(self.blocks)}; resume with the same data and seq_len")
        consumed = int(s["consumed"])
        if consumed % self.world_size:
            raise TinyLlamaError(f"cannot resume on {self.world_size} processes: {consumed} items of this epoch are "
                                 f"consumed, not a multiple of the process count")
        self.epoch, self.pos = int(s["epoch"]), consumed // self.world_size
        self._order = self._make_order()

    def blocks_per_epoch(self) -> int:
        return len(self._order)


def preference_batch(tokenizer, pairs: Sequence[tuple[list[dict], list[dict]]], max_len: int, pad_id: int):
    """Chosen and rejected rendered with a loss mask on the final reply: tensors (2N, T) ids/targets, rows 0..N-1 chosen."""
    rows = []
    for chosen, rejected in pairs:
        for conv in (chosen, rejected):
            ids, mask = render_chat(tokenizer, conv, train_on="last")
            rows.append((ids[: max_len + 1], mask[: max_len + 1]))
    order = list(range(0, len(rows), 2)) + list(range(1, len(rows), 2))
    width = max(len(ids) for ids, _ in rows) - 1
    inp = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, i in enumerate(order):
        ids, mask = rows[i]
        t = torch.tensor(ids[1:], dtype=torch.long)
        t[~torch.tensor(mask[1:], dtype=torch.bool)] = IGNORE
        inp[r, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        tgt[r, : len(ids) - 1] = t
    return inp, tgt
