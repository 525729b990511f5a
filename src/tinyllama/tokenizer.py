"""The Llama 2 tokenizer (32,000-token BPE with byte fallback), shipped inside the package.

Backed by Hugging Face `tokenizers` (Rust, batch-parallel). Also loads a user's own `tokenizer.json`,
a directory holding one, or a SentencePiece `tokenizer.model` (needs the `sentencepiece` package).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tinyllama.errors import TinyLlamaError, json_error_text

# TinyLlama-Chat-v1.0's template (Zephyr style), as in its tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def default_tokenizer_dir() -> Path:
    return Path(str(resources.files("tinyllama") / "assets" / "tokenizer"))


class Tokenizer:
    """encode/decode with explicit control of BOS/EOS; `encode_batch` runs in parallel (Rust threads)."""

    def __init__(self, path: Optional[str | os.PathLike] = None) -> None:
        path = Path(path) if path is not None else default_tokenizer_dir()
        self._sp = None
        self._hf = None
        self.source_path: Optional[Path] = None
        self.config: dict = {}
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                self._load_json(path / "tokenizer.json")
            elif (path / "tokenizer.model").is_file():
                self._load_sentencepiece(path / "tokenizer.model")
            else:
                raise TinyLlamaError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
            cfg = path / "tokenizer_config.json"
            if cfg.is_file():
                try:
                    self.config = json.loads(cfg.read_text())
                except json.JSONDecodeError as e:
                    raise TinyLlamaError(f"{cfg}: not valid JSON ({json_error_text(e)})") from None
        elif path.is_file():
            if path.suffix == ".model":
                self._load_sentencepiece(path)
            else:
                self._load_json(path)
        else:
            raise TinyLlamaError(f"{path}: tokenizer file or directory not found")

        self.bos_id = self._special_id("<s>", 1)
        self.eos_id = self._special_id("</s>", 2)
        self.unk_id = self._special_id("<unk>", 0)
        self.pad_id = self.eos_id  # Llama 2 has no pad token; batched code masks padding anyway

    # ---- loading -------------------------------------------------------------------------------
    def _load_json(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TinyLlamaError(f"{path}: not a valid tokenizers JSON file ({str(e).splitlines()[0][:200]})") from None
        self.source_path = path

    def _load_sentencepiece(self, path: Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise TinyLlamaError(f"{path}: loading a SentencePiece model needs `pip install sentencepiece`") from None
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:
            raise TinyLlamaError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0][:200]})") from None
        self._sp = sp
        self.source_path = path

    def _special_id(self, token: str, default: int) -> int:
        if self._hf is not None:
            i = self._hf.token_to_id(token)
        else:
            i = self._sp.piece_to_id(token)
            i = None if i == self._sp.unk_id() and token != "<unk>" else i
        return default if i is None else int(i)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True) if self._hf is not None else self._sp.get_piece_size()

    def id_to_token(self, i: int) -> str:
        return self._hf.id_to_token(i) if self._hf is not None else self._sp.id_to_piece(i)

    def token_to_id(self, token: str) -> Optional[int]:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        return self._sp.piece_to_id(token)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges: datasets record it so a mismatch is caught."""
        h = hashlib.sha256()
        if self._hf is not None:
            model = json.loads(self._hf.to_str())["model"]
            h.update(json.dumps(model, sort_keys=True).encode())
        else:
            h.update(self._sp.serialized_model_proto())
        return h.hexdigest()[:16]

    # ---- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        if self._hf is not None:
            encs = self._hf.encode_batch_fast(list(texts), add_special_tokens=False) if hasattr(
                self._hf, "encode_batch_fast"
            ) else self._hf.encode_batch(list(texts), add_special_tokens=False)
            out = [e.ids for e in encs]
        else:
            out = self._sp.encode(list(texts))
        pre, post = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [pre + list(ids) + post for ids in out]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids (no BOS/EOS added; special tokens written in the text are recognised) and each token's
        (start, end) character span in `text`: lets chat fine-tuning mask the loss by message."""
        if self._hf is None:
            raise TinyLlamaError("character offsets need a tokenizer.json tokenizer (not a SentencePiece .model)")
        enc = self._hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        return self._sp.decode(ids)

    def stream_decoder(self, prefix: Sequence[int] = ()) -> "StreamDecoder":
        """Text pieces for ids as they come, continuing `prefix` (the prompt). With a tokenizer.json tokenizer
        and a `tokenizers` whose DecodeStream takes a prefix, its own incremental decoder (`DecodeStream`, in Rust: ~4 us a token against
        ~22 for decoding a window of ids, which a server pays on its event loop for every token it streams)."""
        prefix = [int(i) for i in prefix]
        # A prefix whose text holds an incomplete UTF-8 sequence (a window cut mid-character, a prompt ending in
        # stray bytes) would be re-emitted by DecodeStream in the first piece: the window decoder then.
        if self._hf is not None and "\ufffd" not in self.decode(prefix):
            try:
                from tokenizers.decoders import DecodeStream

                return NativeStreamDecoder(self, DecodeStream(ids=prefix, skip_special_tokens=True), prefix)
            except (ImportError, TypeError):  # older tokenizers: no DecodeStream, or none that takes a prefix
                pass
        return StreamDecoder(self, prefix)

    # ---- chat ----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        return self.config.get("chat_template") or CHAT_TEMPLATE

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the (TinyLlama-Chat) Jinja template, as `transformers` does."""
        return _compiled_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_token(self.bos_id),
            eos_token=self.id_to_token(self.eos_id),
        )

    # ---- export --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json (+ tokenizer.model if that is the source)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._hf is not None:
            self._hf.save(str(directory / "tokenizer.json"))
        if self.source_path is not None and self.source_path.suffix == ".model":
            shutil.copyfile(self.source_path, directory / "tokenizer.model")
        cfg = {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): {"content": self.id_to_token(i), "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for i in sorted({self.unk_id, self.bos_id, self.eos_id})
            },
            "bos_token": self.id_to_token(self.bos_id),
            "eos_token": self.id_to_token(self.eos_id),
            "unk_token": self.id_to_token(self.unk_id),
            "pad_token": None,
            "clean_up_tokenization_spaces": False,
            "legacy": True,
            "model_max_length": 2048,
            "padding_side": "left",
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "use_default_system_prompt": False,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        special = {"bos_token": cfg["bos_token"], "eos_token": cfg["eos_token"], "unk_token": cfg["unk_token"]}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
    # Compiling costs ~15 ms; fine-tuning renders every conversation of a dataset, so compile once.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.from_string(source)


class NativeStreamDecoder:
    """`StreamDecoder`'s interface over `tokenizers.decoders.DecodeStream`. DecodeStream refuses a token that
    changes text it already emitted (byte-fallback tokens that formed a character, then a stray byte: the run
    re-decodes as one U+FFFD per byte); from there on the window decoder takes over, from the recent ids."""

    def __init__(self, tokenizer: "Tokenizer", stream, prefix: Sequence[int] = ()) -> None:
        self.tokenizer, self.hf, self.stream = tokenizer, tokenizer._hf, stream
        self.recent = collections.deque(prefix, maxlen=StreamDecoder.CONTEXT)  # ids whose text is out
        self.held: list[int] = []  # ids since the last piece (an incomplete UTF-8 sequence so far)
        self.fallback: Optional[StreamDecoder] = None

    def put(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.fallback is not None:
            return self.fallback.put(token_id)
        try:
            piece = self.stream.step(self.hf, token_id)
        except Exception:  # "Invalid prefix encountered while decoding stream"
            # The window decoder continues from the emitted ids and decodes the held ones and this one again.
            self.fallback = StreamDecoder(self.tokenizer, list(self.recent))
            return "".join(self.fallback.put(i) for i in self.held + [token_id])
        self.held.append(token_id)
        if piece is None:
            return ""
        self.recent.extend(self.held)
        self.held = []
        return piece


class StreamDecoder:
    """Turns a growing list of ids into text pieces, correct across multi-byte and leading-space tokens.

    Each piece is the new end of the decoded text of a window of recent ids, so a put costs the same at the
    10,000th token as at the first (decoding all ids each time made a long output quadratic).
    """

    CONTEXT = 8  # ids kept before the next piece: its leading space and a split UTF-8 sequence need them

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()) -> None:
        # Decoding continues the prefix (the prompt) so a leading space of the first new token survives.
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in prefix][-self.CONTEXT:]
        self.emitted = tokenizer.decode(self.ids) if self.ids else ""  # the decoded text of self.ids

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        if len(self.ids) > 4 * self.CONTEXT:  # everything is emitted: the window can move on
            self.ids = self.ids[-self.CONTEXT:]
            self.emitted = self.tokenizer.decode(self.ids)
        return piece
