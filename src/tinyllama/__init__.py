"""tinyllama: pretrain, evaluate, fine-tune and ship Llama-2-compatible small language models."""

__version__ = "0.1.0"

from tinyllama.config import ModelConfig  # noqa: E402,F401
from tinyllama.errors import TinyLlamaError  # noqa: E402,F401
from tinyllama.generate import DecodeEngine, SamplingConfig, generate, generate_stream  # noqa: E402,F401
from tinyllama.model import Llama  # noqa: E402,F401
from tinyllama.tokenizer import Tokenizer  # noqa: E402,F401
