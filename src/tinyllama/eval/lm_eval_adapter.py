"""lm-evaluation-harness model "tinyllama": every harness task runs on tinyllama's own model and scorer.

lm-eval finds models through its registry. Releases that load plugins read this package's `lm_eval.models`
entry point (pyproject.toml), which names `TinyLlamaLM`, so the plain `lm_eval --model tinyllama ...` works;
older ones (0.4.13 and before) need this module imported first: `python -m tinyllama.eval.lm_eval_cli ...`
(or the `tinyllama-lm-eval` script) does that and then runs the harness's own command line:

    tinyllama-lm-eval --model tinyllama --model_args pretrained=out/hf,dtype=bfloat16 --tasks hellaswag

Log-likelihoods follow the harness's `hf` backend rules (see `tinyllama.eval.scoring`), so scores equal
that backend's on the same weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tinyllama.eval.scoring import Scorer


@register_model("tinyllama")
class TinyLlamaLM(LM):
    def __init__(self, pretrained: str, device: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size=16, max_length: Optional[int] = None, max_batch_size=None, **_ignored) -> None:
        super().__init__()
        from tinyllama.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(str(pretrained), None, device, dtype)
        bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.scorer = Scorer(model, tokenizer, batch_size=bs, max_length=int(max_length) if max_length else None)
        self._device = next(model.parameters()).device

    # model_args win over the harness's own --device/--batch_size defaults (which may say "cuda").
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.source_path or "tinyllama").replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False) -> Optional[str]:
        return self.tokenizer.chat_template if chat_template else None

    # ---- the three request types ---------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        out = self.scorer.loglikelihood(pairs)
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self.scorer.loglikelihood_rolling(texts)
        for t, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tinyllama.generate import SamplingConfig, generate_stream

        results = []
        for r in requests:
            context, gen_kwargs = r.args[0], dict(r.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.id_to_token(self.tokenizer.eos_id)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_p=gen_kwargs.pop("top_p", None),
                                 top_k=gen_kwargs.pop("top_k", None), seed=gen_kwargs.pop("seed", None))
            # Like the hf backend: BOS + context, left-truncated to leave room for the generation.
            ids = self.scorer.encode(context)[-max(1, self.max_length - max_new):]
            new_ids: list[int] = []
            text = ""
            with torch.inference_mode():
                for tok in generate_stream(self.model, ids, cfg, eos_id=self.tokenizer.eos_id):
                    new_ids.append(tok)
                    # Decoded on their own, as the hf backend does (a leading space of the first token drops).
                    text = self.tokenizer.decode(new_ids)
                    if any(s and s != eos_text and s in text for s in until):
                        break
            for s in until:
                if s and s in text:
                    text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, r.args[1]), text)
            results.append(text)
        return results
