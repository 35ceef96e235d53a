"""Judges that score an answer 0-100 for trait expression and for coherence.

- :class:`LocalJudge`: a Hugging Face chat model asked for one digit 0-9; the score is the
  probability-weighted mean digit (x 100/9), read from the model's log-probs of the digit
  tokens. Offline and real, if weak with a small model.
- :class:`EndpointJudge`: any OpenAI-compatible ``/chat/completions`` endpoint; the number in
  its reply is the score. The key comes from an environment variable.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Protocol

import torch

from residlab.errors import UsageError
from residlab.prompts import template_ids

__all__ = ["EndpointJudge", "Judge", "LocalJudge", "coherence_prompt", "trait_prompt"]


def trait_prompt(definition: str, question: str, answer: str, scale: str) -> str:
    return (f"You rate how strongly an answer expresses a trait.\n\nTrait rubric:\n{definition}"
            f"\n\nQuestion: {question}\nAnswer: {answer}\n\nRate the answer's expression of "
            f"the trait {scale}. Reply with the number only.")


def coherence_prompt(question: str, answer: str, scale: str) -> str:
    return (f"Question: {question}\nAnswer: {answer}\n\nHow coherent, fluent and on-topic is "
            f"the answer, whatever its opinions? Rate it {scale} (lowest: gibberish, highest: "
            "perfectly clear). Reply with the number only.")


class Judge(Protocol):
    name: str

    def score(self, prompts: list[str]) -> list[float]:
        """0-100 for each rating prompt."""


class LocalJudge:
    """Probability-weighted digit rating from a local chat model."""

    scale = "from 0 (none) to 9 (extreme)"

    def __init__(self, loaded, batch_size: int = 16):
        self.loaded = loaded
        self.name = f"local:{loaded.name}"
        self.batch_size = batch_size
        tokenizer = loaded.tokenizer
        self.digit_ids = []
        for digit in "0123456789":
            ids = tokenizer(digit, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UsageError(f"judge tokenizer splits the digit {digit!r}; use another "
                                 "judge model or --judge-url")
            self.digit_ids.append(ids[0])

    def score(self, prompts: list[str]) -> list[float]:
        from residlab.generation import padded_inputs

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        digits = torch.tensor(self.digit_ids)
        values = torch.arange(10, dtype=torch.float32) * (100 / 9)
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = [template_ids(tokenizer, [{"role": "user", "content": p}])[1]
                    for p in prompts[start:start + self.batch_size]]
            inputs = padded_inputs(rows, tokenizer.pad_token_id or 0, self.loaded.device)
            with torch.inference_mode():
                logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V)
            probs = torch.softmax(logits[:, digits.to(logits.device)], dim=-1).cpu()  # (B, 10)
            out += (probs @ values).tolist()
        return out


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (``--judge-url``, ``--judge-model``)."""

    scale = "from 0 (none) to 100 (extreme)"

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions")
                                      else "/chat/completions")
        self.model, self.timeout = model, timeout
        self.key = os.environ.get(key_env, "")
        self.name = f"endpoint:{model}@{url}"

    def _ask(self, prompt: str) -> float:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 8,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as error:
            raise ConnectionError(f"judge endpoint {self.url} cannot be reached or answered "
                                  f"badly ({' '.join(str(error).split())[:120]})") from None
        match = re.search(r"\d+(?:\.\d+)?", reply)
        return min(100.0, max(0.0, float(match.group()))) if match else float("nan")

    def score(self, prompts: list[str]) -> list[float]:
        return [self._ask(prompt) for prompt in prompts]
