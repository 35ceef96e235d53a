"""Progress when output is not a terminal: log lines with count, rate and ETA."""

from __future__ import annotations

import io
import logging

import yaml

from residlab.cli import main
from residlab.progress import LogProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_anything_else_gets_log_lines():
    assert not isinstance(progress(total=3, stream=Terminal()), LogProgress)
    assert isinstance(progress(total=3, stream=io.StringIO()), LogProgress)


def test_log_lines_count_rate_eta_and_resume(caplog, monkeypatch):
    monkeypatch.setenv("RESIDLAB_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="residlab.progress")
    bar = progress(total=10, desc="capture", unit="prompts", initial=4, stream=io.StringIO())
    bar.update(3)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "capture: resuming, 4/10 prompts (40%) already done"
    assert lines[1].startswith("capture: 7/10 prompts (70%), ") and "prompts/s" in lines[1]
    assert "ETA" in lines[1]
    assert lines[-1].endswith("(done)") and "7/10" in lines[-1]


def test_interval_limits_the_lines(caplog):
    caplog.set_level(logging.INFO, logger="residlab.progress")
    bar = LogProgress(total=1000, desc="x", unit="rows", interval=3600)
    for _ in range(1000):
        bar.update()
    bar.close()
    assert len(caplog.records) == 1  # only the closing line within the hour


def test_noising_run_logs_progress_without_a_terminal(tmp_path, tiny_llama_dir, caplog,
                                                      monkeypatch):
    monkeypatch.setenv("RESIDLAB_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO)
    config = dict(model_name=str(tiny_llama_dir), dtype="fp32", device="cpu", num_prompts=2,
                  max_prompt_len=64, batch_size=2, max_new_tokens=2, layer_index=1,
                  noise_norms=[0.0, 4.0], num_noise_vectors=2, output_dir=str(tmp_path / "o"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["noise", "generate", "--config", str(path)]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("loading ") and "(local, float32, cpu)" in m for m in messages)
    assert any(m.startswith("noising: 6/6 generations (100%)") for m in messages), messages
