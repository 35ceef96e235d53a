"""Re-tokenised scoring: the scored span is the answer, never the template around it.

The reference here has its own byte-level tokenizer and a chat template whose closing text
("</s>\\nend im>\\n") contains the short answers "\\n", ">", "end" and "im", so a search for
the answer from the end of the rendering finds the template instead.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.models import load_model
from residlab.noising.eval import run_eval, summarize
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir
from residlab.noising.viz import build_payload
from residlab.store import read_jsonl

ANSWERS = ["\n", ">", "end", "im"]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}>\n{{ CONTENT }}</s>\nend im>\n"
            "{% endfor %}{% if add_generation_prompt %}<s>assistant>\n{% endif %}")
PLAIN = TEMPLATE.replace("CONTENT", "m['content']")
# Upper-cases the assistant's text: "end" and "im" are rewritten, "\n" and ">" are not.
UPPER = TEMPLATE.replace("CONTENT", "m['content'] | upper if m['role'] == 'assistant' "
                                    "else m['content']")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}" + PLAIN)


def _reference(folder, template: str):
    """A tiny Llama with its own byte-level tokenizer (other ids than the generator's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["the end of a message\n> quoted\nimport im\n\n"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = template
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         vocab_size=len(tokenizer), pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), dtype="fp32", device="cpu")


def _run(tmp_path, tiny_llama, tiny_llama_dir, **changes):
    """A run with one generation per answer, each ending with the stop token."""
    cfg = NoisingConfig(**{**dict(
        model_name=str(tiny_llama_dir), dtype="fp32", device="cpu", num_prompts=4,
        max_prompt_len=64, batch_size=4, max_new_tokens=3, layer_index=1, noise_norms=[0.0],
        num_noise_vectors=1, seed=0, output_dir=str(tmp_path / "out")), **changes})
    run_dir = run_generate(cfg, loaded=tiny_llama)
    (path,) = RunDir(run_dir).gens_files()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for line, answer in zip(lines, ANSWERS, strict=True):
        line["assistant_text"], line["finish_reason"] = answer, "stop"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return cfg, run_dir


def _oracle(reference, record: dict, with_end: bool) -> tuple[list[int], list[float]]:
    """The answer's own tokens after the generation prompt, and their plain-forward log-probs."""
    tok = reference.tokenizer
    prompt = tok.apply_chat_template(record["messages"], tokenize=False,
                                     add_generation_prompt=True)
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    answer = tok(record["assistant_text"], add_special_tokens=False)["input_ids"]
    answer += [tok.eos_token_id] if with_end else []
    ids = head + answer
    with torch.no_grad():
        logprobs = torch.log_softmax(reference.model(torch.tensor([ids])).logits[0], -1)
    return answer, [logprobs[t - 1, ids[t]].item() for t in range(len(head), len(ids))]


@pytest.mark.parametrize("score_eos", [True, False])
def test_short_answers_score_their_own_tokens(tmp_path, tiny_llama, tiny_llama_dir, score_eos):
    cfg, run_dir = _run(tmp_path, tiny_llama, tiny_llama_dir)
    reference = _reference(tmp_path / "ref", PLAIN)
    out, _ = run_eval(cfg.model_copy(update={"reference_model_name": str(tmp_path / "ref")}),
                      run_dir, loaded=reference, score_eos=score_eos)
    records = read_jsonl(out)
    assert sorted(r["assistant_text"] for r in records) == sorted(ANSWERS)
    for record in records:
        assert record["scoring"] == "retokenized" and "unscored" not in record
        ids, expected = _oracle(reference, record, with_end=score_eos)
        assert record["tokens"] == [reference.tokenizer.decode([i]) for i in ids]
        assert record["per_token_logprobs"] == pytest.approx(expected, abs=1e-5)
        assert "".join(record["tokens"]) == record["assistant_text"] + "</s>" * score_eos


def test_rewritten_answers_are_skipped_and_counted(tmp_path, tiny_llama, tiny_llama_dir,
                                                   caplog):
    cfg, run_dir = _run(tmp_path, tiny_llama, tiny_llama_dir)
    reference = _reference(tmp_path / "ref", UPPER)
    with caplog.at_level(logging.WARNING, logger="residlab.noising.eval"):
        out, skipped = run_eval(cfg, run_dir, loaded=reference)
    assert skipped == []
    records = {r["assistant_text"]: r for r in read_jsonl(out)}
    for answer in ("\n", ">"):  # unchanged by the template: scored as usual
        ids, expected = _oracle(reference, records[answer], with_end=True)
        assert records[answer]["per_token_logprobs"] == pytest.approx(expected, abs=1e-5)
    for answer in ("end", "im"):
        record = records[answer]
        assert "rewrites" in record["unscored"]
        assert record["mean_logprob"] is None and record["total_logprob"] is None
        key = f"noise 0, scale 0, prompt {record['prompt_index']}: "
        assert any(key in message for message in caplog.messages)
    summary = summarize(list(records.values()))
    assert "2 generation(s) not scored" in summary
    assert summary.splitlines()[1].split()[:2] == ["0", "2"]  # scale 0: two scores
    payload = build_payload(list(records.values()), top_n=5, run_name="r", config={})
    assert payload["n_unscored"] == 2 and payload["chart"]["mean_logprob"]["quantiles"][0]["n"] == 2


def test_template_rejecting_a_role_is_one_line(tmp_path, tiny_llama, tiny_llama_dir):
    cfg, run_dir = _run(tmp_path, tiny_llama, tiny_llama_dir, system_prompt="Be brief.")
    reference = _reference(tmp_path / "ref", NO_SYSTEM)
    with pytest.raises(UsageError) as caught:
        run_eval(cfg, run_dir, loaded=reference)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "ref") in message
    assert "'system' role" in message and "System role not supported" in message
