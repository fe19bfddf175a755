"""`marserve generate` and `marserve inspect` on baby checkpoints."""

from marserve import LLM, SamplingParams
from marserve.cli import main


def test_generate_prints_greedy_completion(baby_checkpoint, capsys):
    path = baby_checkpoint("olmoe")
    want = LLM(path).generate(["the fox"], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    capsys.readouterr()
    assert main(["generate", str(path), "--prompt", "the fox", "--max-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_inspect_reports_architecture_counts_and_mar(baby_checkpoint, capsys):
    import torch
    from transformers import AutoModelForCausalLM
    path = baby_checkpoint("qwen2_moe", mar=True, affinity_scale=0.5)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    hf_total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).parameters())
    assert "architecture:   qwen2_moe" in out and "E=4 top-k=2" in out
    assert f"{hf_total:,} total" in out
    assert "MAR:            version 1, 4 memory slots per expert, affinity_scale 0.5, all MoE layers" in out
    plain = baby_checkpoint("qwen2_moe")
    assert main(["inspect", str(plain)]) == 0
    assert "MAR:            none" in capsys.readouterr().out


def test_generate_echo_prints_each_prompt_before_its_output(baby_checkpoint, capsys):
    path = baby_checkpoint("olmoe")
    want = LLM(path).generate(["the fox", "a"], SamplingParams(max_tokens=4, temperature=0))
    capsys.readouterr()
    assert main(["generate", str(path), "--prompt", "the fox", "--prompt", "a", "--max-tokens", "4",
                 "--temperature", "0", "--echo"]) == 0
    assert capsys.readouterr().out == "".join(f"{p}{o.outputs[0].text}\n" for p, o in zip(["the fox", "a"], want))
