"""A specialist on the real SmolLM2-135M base, served by llama.cpp in this process.

The specialist is a LoRA adapter with random non-zero B on the converted SmolLM2 base (what
`--base smollm2-135m` trains on); llama.cpp runs the original GGUF the base was converted from
with the adapter as a GGUF LoRA adapter, chosen per request. Kept cheap: 3 prompts, 16 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from specialists.export.parity import BUILTIN_PROMPTS, check_parity_in_llamacpp, reference_probes


@pytest.fixture(scope="session")
def smollm2_specialist(smollm2_base, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialists.export.gguf_lora import write_lora_gguf

    root = tmp_path_factory.mktemp("smollm2-specialist")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    base = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    model.save_pretrained(root / "adapter")
    model.eval()
    lora = write_lora_gguf(root / "adapter", base.config, root / "adapter.gguf", name="smollm2-test-lora")
    conversations = [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS]
    probes = reference_probes(model, tokenizer, conversations)
    with model.disable_adapter():
        base_probes = reference_probes(model, tokenizer, conversations)
    gguf = Path(json.loads((Path(smollm2_base) / "atelier-base.json").read_text())["gguf"])
    return SimpleNamespace(root=root, adapter=root / "adapter", lora=lora, gguf=gguf, tokenizer=tokenizer,
                           probes=probes, base_probes=base_probes)


def test_the_adapter_changes_the_greedy_continuations(smollm2_specialist):
    s = smollm2_specialist
    assert any(p.tokens != b.tokens for p, b in zip(s.probes, s.base_probes, strict=True))


def test_llama_cpp_with_the_gguf_adapter_matches_transformers_base_plus_adapter(smollm2_specialist):
    s = smollm2_specialist
    report = check_parity_in_llamacpp(s.probes, s.gguf, "quantized", "SmolLM2 + adapter", s.tokenizer, adapter=s.lora)
    assert report.tokens >= 16 and report.max_drift_sigma < 1.0
    bare = check_parity_in_llamacpp(s.base_probes, s.gguf, "quantized", "SmolLM2", s.tokenizer)
    assert bare.tokens >= 16


def test_with_the_adapter_off_llama_cpp_does_not_match_the_specialist(smollm2_specialist):
    """The parity check can fail: the bare base is not the specialist."""
    from atelier.errors import AtelierError

    s = smollm2_specialist
    with pytest.raises(AtelierError, match="parity check failed"):
        check_parity_in_llamacpp(s.probes, s.gguf, "quantized", "SmolLM2 without its adapter", s.tokenizer)


def test_a_registered_specialist_served_by_llama_cpp_answers_through_the_runtime(smollm2_specialist, smollm2_base,
                                                                                 tmp_path):
    from specialists.generation import GenerationParams
    from specialists.registry import Registry
    from specialists.runtime import RuntimeConfig, SpecialistRuntime
    from specialists.served import LlamacppBackend

    s = smollm2_specialist
    export_dir = tmp_path / "export"  # the layout `specialist export --to gguf --serve` writes
    export_dir.mkdir()
    (export_dir / "export.json").write_text(json.dumps({"llamacpp": {"base": str(s.gguf), "adapter": str(s.lora)}}))
    registry = Registry(tmp_path / "home")
    registry.register("smol", base_model=str(smollm2_base), adapter_dir=s.adapter, eval_report={}, force=True,
                      served_by=f"llamacpp:{export_dir}")
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu", served_num_ctx=512))
    question = [{"role": "user", "content": BUILTIN_PROMPTS[0]}]
    served = runtime.generate("smol", question, GenerationParams(max_tokens=12))
    assert runtime.loaded() == {} and served.usage.completion_tokens == 12 and served.finish_reason == "length"
    assert served.text == s.tokenizer.decode(s.probes[0].tokens[:12])  # greedy: the specialist's own tokens

    bare = LlamacppBackend(str(export_dir), num_ctx=512, adapter_scale=0.0).generate(question,
                                                                                      GenerationParams(max_tokens=12))
    assert bare.text == s.tokenizer.decode(s.base_probes[0].tokens[:12])
    streamed = list(runtime.stream("smol", question, GenerationParams(max_tokens=6)))
    assert "".join(streamed) == s.tokenizer.decode(s.probes[0].tokens[:6])
