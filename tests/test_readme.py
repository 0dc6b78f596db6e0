"""The README's code runs: the "Without Lightning" loop, on the CPU with a tiny model and a small data file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def _snippet(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"### {title}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_without_lightning_loop_runs(tmp_path, tokenizer):
    code = _snippet("Without Lightning")
    assert "optimizer.zero_grad()" in code and "loader =" in code
    model_dir, data = tmp_path / "model", tmp_path / "sft.jsonl"
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "response": str(i + 1)}) + "\n" for i in range(6)))
    runnable = (
        code.replace("/models/Qwen2.5-7B", str(model_dir))
        .replace("/data/sft.jsonl", str(data))
        .replace('"cuda"', '"cpu"')
        .replace('compute_dtype="bf16"', 'compute_dtype="fp32"')
        .replace("max_seq_len=2048", "max_seq_len=64")
    )
    namespace: dict = {}
    exec(compile(runnable, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    engine, model = namespace["engine"], namespace["model"]
    before = Qwen2ForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(p, before[n]) for n, p in model.state_dict().items())  # it trained
    engine.close()
