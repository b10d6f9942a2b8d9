"""Greedy generation for exact-match tasks: a quantized model can keep its perplexity and still
lose the answer's format, which only shows when it has to write the answer itself.

Like lm-eval's ``generate_until`` with ``until=["\\n"]``: greedy (argmax) decoding with a key/value
cache, stopping at EOS, at the first newline (the text before it is the answer), or after
``max_new_tokens`` tokens. One prompt at a time: prompts differ in length and decoding is
sequential, so batching would need left padding and attention masks for little gain on the short
prompt sets this is meant for.
"""

from __future__ import annotations

import torch

STOP_TEXT = "\n"


@torch.inference_mode()
def greedy_until_newline(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt_ids``, cut before the first newline."""
    device = next(model.parameters()).device
    # the prompt's last position only: its other logits (prompt × vocabulary floats) are never needed
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if STOP_TEXT in text:
            return text.split(STOP_TEXT, 1)[0]
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)
    return text
