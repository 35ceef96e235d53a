"""Inference tools: experiments' responses, raw activation capture, and readers.

A notebook session reads::

    from residlab.experiments import load_experiment, load_variant
    from residlab.inference import generate_responses, capture_prompt_set, load_raw

    exp = load_experiment("my_exp")
    lm = load_variant(exp, "instruct")
    generate_responses(exp, "single_trait", variant="instruct", loaded=lm)
    capture_prompt_set(exp, "single_trait", variant="instruct", loaded=lm)
    raw = load_raw(exp.raw_dir("instruct", "single_trait") / "1.safetensors")
    raw["response"]["activations"][10]["residual"]   # Tensor[n_response_tokens, d_model]
    logit_lens(lm, raw["prompt"]["token_ids"], layers=[10, 20])   # per-token lens readout
    attention_patterns(lm, token_ids, layers=[10])   # (1, n_heads, T, T) from an eager pass
"""

from residlab.inference.attention import attention_patterns
from residlab.inference.capture import capture_prompt_set, parse_layers
from residlab.inference.lens import logit_lens
from residlab.inference.prompt_sets import available_prompt_sets, load_prompt_set
from residlab.inference.raw import load_raw
from residlab.inference.responses import generate_responses

__all__ = [
    "attention_patterns",
    "available_prompt_sets",
    "capture_prompt_set",
    "generate_responses",
    "load_prompt_set",
    "load_raw",
    "logit_lens",
    "parse_layers",
]
