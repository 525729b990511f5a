"""Checkpoint conversion: Hugging Face directories (hf.py); other formats live beside it."""

from tinyllama.convert.hf import (  # noqa: F401
    from_hf_state_dict,
    load_hf_model,
    parse_dtype,
    read_safetensors,
    save_hf_model,
    to_hf_state_dict,
)
