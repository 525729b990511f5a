"""Checkpoint conversion: Hugging Face directories (hf.py) and GGUF (gguf.py). State dicts and configs in,
files out (and back): this package never imports the model (`Llama.from_pretrained` calls into it)."""

from tinyllama.convert.hf import (  # noqa: F401
    check_state_dict,
    from_hf_state_dict,
    parse_dtype,
    read_hf_checkpoint,
    read_safetensors,
    refuse_fused,
    save_hf_model,
    to_hf_state_dict,
)
