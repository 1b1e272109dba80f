"""Exporting specialists (merged, GGUF, Ollama, vLLM) on the tiny test models, with the parity check.

Every export is checked against an independent reference: transformers' own generate() with the
adapter on its base. The GGUF tests also run the numpy reference forward pass, so a wrong Q/K
permutation or a damaged tensor shows up as different tokens. Offline; the live Ollama test
runs only with OLLAMA_HOST set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from atelier.errors import AtelierError
from atelier.home import umask
from specialists.export import gguf_writer
from specialists.export.cli import register_export
from specialists.export.common import load_specialist
from specialists.export.ollama import CHATML_GO_TEMPLATE, ollama_template
from specialists.export.parity import (
    BUILTIN_PROMPTS,
    check_parity_in_llamacpp,
    held_out_conversations,
    llamacpp_greedy,
    reference_probes,
)
from specialists.export.pipeline import export_specialist
from specialists.registry import Registry
from tests.tinymodels import CHAT_TEMPLATE, build_adapter, build_base, build_tokenizer

ASK = [{"role": "user", "content": "How do I bleed the hydraulic pump?"}]
HELD_OUT = ["Which seal fits the HX-200 pump?", "What torque do the bearing bolts need?",
            "When is the impeller inspected?", "How is the motor locked out?", "What does fault E14 mean?",
            "This sixth prompt is never used."]
EVAL_REPORT = {"stages": {"base": {"perplexity": 900.0, "mcq_accuracy": 0.25},
                          "sft": {"perplexity": 120.5, "mcq_accuracy": 0.5, "token_f1": 0.31}},
               "final_stage": "sft", "beats_base": True,
               "reasons": ["sft beats the base: it needs lower perplexity and higher mcq_accuracy"]}


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("export-models")
    tokenizer = build_tokenizer()
    base = build_base(root / "base", tokenizer, 0)
    run_dir = root / "run"
    (run_dir / "data" / "sft").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Answer."}]} for q in HELD_OUT]
    (run_dir / "data" / "sft" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(base=base, adapter=build_adapter(base, root / "adapter", 7), run_dir=run_dir)


@pytest.fixture
def registry(models, atelier_home) -> Registry:
    registry = Registry()
    registry.register("pumps", base_model=str(models.base), adapter_dir=models.adapter, eval_report=EVAL_REPORT,
                      keywords=["pump", "seal", "impeller"], run_dir=models.run_dir,
                      data_manifest_hashes={"data": "ab12cd34", "sft/train.jsonl": "ef56"},
                      config={"base": "scratch:tiny", "stages": ["sft"], "sft": {"max_steps": 150, "learning_rate": 2e-4},
                              "lora": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}})
    return registry


def prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_tokens(model_dir: Path, adapter: Path | None, ids: list[int], count: int = 16) -> list[int]:
    """transformers' own greedy generate(), the reference every export is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=count, do_sample=False,
                             min_new_tokens=count, pad_token_id=0)
    return out[0, len(ids):].tolist()


def logits_of(model_dir: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def gguf_greedy(path: Path, ids: list[int], count: int = 16) -> list[int]:
    """The GGUF file's greedy continuation, run in llama.cpp itself."""
    from atelier.llamacpp import private_server

    with private_server(path, n_ctx=256) as server:
        return llamacpp_greedy(server.url.removesuffix("/v1"), ids, count)[0]


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ----------------------------------------------------------------------------- merged


def test_merged_export_matches_the_adapter_on_its_base_and_has_a_model_card(registry, models, atelier_home):
    result = export_specialist("pumps", "merged", registry=registry)

    out = atelier_home / "exports" / "pumps-v1-merged"
    assert Path(result.out_dir) == out
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
            "export.json"} <= set(result.files)
    assert not list(out.glob("*.bin"))
    assert result.parity.prompts == 5 and result.parity.tokens > 0 and result.parity.precision == "f32"
    ids = prompt_ids(models.base)
    expected = greedy_tokens(models.base, models.adapter, ids)
    assert greedy_tokens(out, None, ids) == expected
    assert expected != greedy_tokens(models.base, None, ids)  # the adapter really changes the answer

    card = front_matter(out / "README.md")
    assert card["base_model"] == "scratch:tiny" and card["library_name"] == "transformers"
    assert {"atelier", "specialist", "merged"} <= set(card["tags"])
    assert card["datasets"] == ["pumps-data@ab12cd34"]
    metrics = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"perplexity": 120.5, "mcq_accuracy": 0.5, "token_f1": 0.31}
    body = (out / "README.md").read_text()
    for heading in ("## Intended use", "## Limitations", "## Training", "## Evaluation", "## Data"):
        assert heading in body
    assert "| held-out perplexity | 900 | 120.5 |" in body
    mask = umask()
    assert mask == os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]} == {0o777 & ~mask, 0o666 & ~mask}
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["parity"]["prompts"] == 5 and manifest["target"] == "merged"


def test_a_full_model_specialist_exports_merged_in_f16_and_to_gguf_but_not_to_vllm(registry, models, tmp_path):
    registry.register("solo", base_model=str(models.base), model_dir=models.base, eval_report=EVAL_REPORT)
    merged = export_specialist("solo", "merged", quantize="f16", out=tmp_path / "m", registry=registry)
    assert merged.parity.precision == "f16" and merged.parity.prompts == 3  # no run: the built-in prompts
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    assert front_matter(tmp_path / "m" / "README.md")["library_name"] == "transformers"
    assert export_specialist("solo", "gguf", out=tmp_path / "g", registry=registry).parity.precision == "f16"
    with pytest.raises(AtelierError, match="full model, not an adapter; export --to merged"):
        export_specialist("solo", "vllm", registry=registry)


def test_held_out_prompts_come_from_the_run_and_fall_back_to_built_ins(registry, models):
    record = registry.get("pumps")
    assert [c[-1]["content"] for c in held_out_conversations(record)] == HELD_OUT[:5]
    fallback = held_out_conversations(record.model_copy(update={"run_dir": None}))
    assert [c[0]["content"] for c in fallback] == list(BUILTIN_PROMPTS)


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("quantize, weight_type", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_reads_back_with_llama_metadata_and_llama_cpp_runs_it(registry, models, tmp_path, quantize,
                                                                           weight_type):
    from gguf import GGUFReader

    result = export_specialist("pumps", "gguf", quantize=quantize, out=tmp_path / "gguf", registry=registry)

    path = tmp_path / "gguf" / f"pumps-v1-{quantize}.gguf"
    written = [path.name, f"base-{quantize}.gguf", "pumps-v1-lora.gguf", "README.md"]
    assert result.files == sorted(written) + ["export.json"]
    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's name; it refuses "gpt2"
    assert (meta["llama.context_length"], meta["llama.embedding_length"], meta["llama.block_count"],
            meta["llama.feed_forward_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"]) == (256, 64, 2, 128, 4, 4)
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3] and set(meta["tokenizer.ggml.token_type"][4:]) == {1}
    assert len(meta["tokenizer.ggml.merges"]) > 0 and " " in meta["tokenizer.ggml.merges"][0]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (0, 2, 3)
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    vocab = len(meta["tokenizer.ggml.tokens"])
    assert len(tensors) == 2 + 2 * 9 and "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert list(tensors["token_embd.weight"].shape) == [64, vocab]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [128, 64]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == weight_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    ids = prompt_ids(models.base)
    if quantize == "f16":
        assert gguf_greedy(path, ids) == greedy_tokens(models.base, models.adapter, ids)
    else:  # q8_0 flips near-ties of this chaotic random model: its logits stay within tolerance instead
        assert result.parity.max_drift_sigma > 1e-3  # really quantized, and still passed the parity check
    assert result.parity.artefact == "GGUF file in llama.cpp" and result.parity.tokens > 0


def test_gguf_f32_in_llama_cpp_matches_transformers_which_proves_the_qk_permutation(registry, models, tmp_path):
    result = export_specialist("pumps", "gguf", quantize="f32", out=tmp_path / "gguf", registry=registry)
    assert result.parity.max_drift_sigma < 0.01
    ids = prompt_ids(models.base)
    assert gguf_greedy(tmp_path / "gguf" / "pumps-v1-f32.gguf", ids) == greedy_tokens(models.base, models.adapter, ids)


def test_the_adapter_as_a_gguf_lora_adapter_runs_in_llama_cpp_on_the_base_gguf(registry, models, tmp_path):
    """The GGUF LoRA adapter has llama.cpp's metadata; on the exported base in llama.cpp, turned on per
    request, it continues as the adapter on its base in transformers, and turned off as the bare base."""
    from atelier.llamacpp import private_server
    from specialists.export.gguf_lora import read_adapter_metadata

    result = export_specialist("pumps", "gguf", quantize="f32", out=tmp_path / "gguf", registry=registry)
    lora, base = tmp_path / "gguf" / "pumps-v1-lora.gguf", tmp_path / "gguf" / "base-f32.gguf"
    meta = read_adapter_metadata(lora)
    assert {k: meta[k] for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")} == {
        "general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    tensors = meta["tensors"]
    assert tensors["blk.0.attn_q.weight.lora_a"] == [64, 4] and tensors["blk.1.attn_q.weight.lora_b"] == [4, 64]
    assert tensors["blk.0.ffn_up.weight.lora_b"] == [4, 128]  # ggml order: (rank, out) for B, (in, rank) for A
    assert {n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a")} == {
        n.removesuffix(".lora_b") for n in tensors if n.endswith(".lora_b")}
    assert result.adapter_parity.artefact == "base GGUF + GGUF LoRA adapter in llama.cpp"
    assert result.adapter_parity.max_drift_sigma < 0.01 and result.adapter_parity.tokens > 0
    manifest = json.loads((tmp_path / "gguf" / "export.json").read_text())
    assert manifest["llamacpp"] == {"base": str(base), "adapter": str(lora), "base_precision": "f32"}

    ids = prompt_ids(models.base)
    with_adapter, bare = greedy_tokens(models.base, models.adapter, ids), greedy_tokens(models.base, None, ids)
    assert with_adapter != bare  # the adapter matters, so the comparison below can fail
    with private_server(base, n_ctx=256, adapters=(lora,)) as server:
        address = server.url.removesuffix("/v1")
        assert llamacpp_greedy(address, ids, 16, lora=[{"id": 0, "scale": 1.0}])[0] == with_adapter
        assert llamacpp_greedy(address, ids, 16, lora=[{"id": 0, "scale": 0.0}])[0] == bare


def test_a_gguf_export_with_serve_is_served_by_llama_cpp_through_the_runtime(registry, models, tmp_path):
    from specialists.generation import GenerationParams
    from specialists.runtime import RuntimeConfig, SpecialistRuntime

    result = export_specialist("pumps", "gguf", quantize="f32", out=tmp_path / "gguf", registry=registry, serve=True)
    assert result.served_by == f"llamacpp:{tmp_path / 'gguf'}"
    record = registry.get("pumps")
    assert (record.version, record.served_by) == (2, result.served_by)
    with pytest.raises(AtelierError, match="--serve .* applies to --to gguf"):
        export_specialist("pumps", "merged", out=tmp_path / "m", registry=registry, serve=True)

    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu", served_num_ctx=256))
    served = runtime.generate("pumps", ASK, GenerationParams(max_tokens=8))
    assert runtime.loaded() == {}  # llama.cpp answered, nothing was loaded in transformers
    registry.rollback("pumps")  # v1: the same adapter, run by transformers
    local = runtime.generate("pumps", ASK, GenerationParams(max_tokens=8))
    assert (served.version, local.version) == (2, 1)
    assert served.text == local.text and served.usage.completion_tokens == local.usage.completion_tokens == 8


def test_transformers_gguf_reader_loads_our_file_as_the_same_model_and_tokenizer(registry, models, tmp_path):
    """transformers reads llama.cpp's GGUF files (undoing the Q/K permutation, rebuilding the BPE
    tokenizer from tokens and merges): an independent check of our names, metadata and vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_specialist("pumps", "gguf", quantize="f32", out=tmp_path / "gguf", registry=registry)
    export_specialist("pumps", "merged", out=tmp_path / "merged", registry=registry)
    name = "pumps-v1-f32.gguf"
    ids = prompt_ids(models.base)
    text = AutoTokenizer.from_pretrained(models.base).apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=name)(text, add_special_tokens=False)["input_ids"] == ids
    with torch.inference_mode():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=name)(torch.tensor([ids])).logits
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(torch.tensor([ids])).logits
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_gguf_with_a_broken_vocabulary_is_refused(registry, atelier_home, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.add_token_merges
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_merges", lambda self, merges: real(self, merges[: len(merges) // 2]))
    with pytest.raises(AtelierError, match="tokenizes .* differently from the original tokenizer"):
        export_specialist("pumps", "gguf", registry=registry)
    assert not (atelier_home / "exports").exists() or list((atelier_home / "exports").iterdir()) == []


def test_a_damaged_gguf_tensor_fails_the_parity_check(registry, tmp_path):
    export_specialist("pumps", "gguf", quantize="f32", out=tmp_path / "gguf", registry=registry)
    path = tmp_path / "gguf" / "pumps-v1-f32.gguf"
    model, tokenizer = load_specialist(registry.get("pumps"))
    probes = reference_probes(model, tokenizer, held_out_conversations(registry.get("pumps")))
    good = gguf_writer.GgufFile(path)
    check_parity_in_llamacpp(probes, path, "f32", "GGUF file", tokenizer)

    tensor = good.tensors["blk.1.ffn_down.weight"]
    data = np.memmap(path, dtype=np.float32, mode="r+", offset=tensor.data_offset, shape=(tensor.n_elements,))
    data[:] = np.random.default_rng(0).normal(0, 0.5, data.shape)  # a damaged (or wrongly converted) tensor
    data.flush()
    del data
    with pytest.raises(AtelierError, match=r"parity check failed .* llama.cpp.* prompt 1/5 .*expected tokens \[.*got \["):
        check_parity_in_llamacpp(probes, path, "f32", "GGUF file", tokenizer)


def test_without_the_qk_permutation_the_export_fails_and_writes_nothing(registry, atelier_home, monkeypatch):
    monkeypatch.setattr(gguf_writer, "permute", lambda weight, n_head: weight)
    with pytest.raises(AtelierError, match="parity check failed for the GGUF file"):
        export_specialist("pumps", "gguf", registry=registry)
    exports = atelier_home / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []  # no output, no staging leftovers


def test_q4_k_m_needs_llama_quantize_and_unknown_quantizations_are_refused(registry):
    with pytest.raises(AtelierError, match="llama-quantize") as error:
        export_specialist("pumps", "gguf", quantize="q4_k_m", registry=registry)
    assert "\n" not in str(error.value)
    with pytest.raises(AtelierError, match="unsupported quantization 'q3' for --to gguf"):
        export_specialist("pumps", "gguf", quantize="q3", registry=registry)
    with pytest.raises(AtelierError, match=r"unsupported quantization 'q8_0' for --to merged.*--to gguf"):
        export_specialist("pumps", "merged", quantize="q8_0", registry=registry)
    with pytest.raises(AtelierError, match="leave --quantize out"):
        export_specialist("pumps", "vllm", quantize="f16", registry=registry)


def test_unknown_specialist_or_target_is_a_one_line_error(registry):
    with pytest.raises(AtelierError, match="no specialist named 'nope'") as error:
        export_specialist("nope", "merged", registry=registry)
    assert "\n" not in str(error.value)
    with pytest.raises(AtelierError, match=r"unknown export target 'onnx'; use --to merged \| gguf"):
        export_specialist("pumps", "onnx", registry=registry)


def test_an_export_replaces_an_older_export_but_never_a_foreign_folder(registry, tmp_path):
    tmp_path = tmp_path / "exports"
    export_specialist("pumps", "vllm", out=tmp_path / "a", registry=registry)
    export_specialist("pumps", "vllm", out=tmp_path / "a", registry=registry)  # again: replaced in one rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(AtelierError, match="already holds files that no export wrote"):
        export_specialist("pumps", "vllm", out=tmp_path / "b", registry=registry)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- Ollama


def test_ollama_modelfile_for_a_chatml_specialist_without_a_server(registry, tmp_path):
    result = export_specialist("pumps", "ollama", out=tmp_path / "ollama", registry=registry, create=False,
                               reachable=lambda url: pytest.fail("must not probe with create=False"))

    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == "FROM ./pumps-v1-f16.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\nPARAMETER num_ctx 256\n' in modelfile
    assert "ADAPTER" not in modelfile and "SYSTEM" not in modelfile
    assert result.served_by is None
    assert result.commands[0] == f"ollama create pumps -f {tmp_path / 'ollama' / 'Modelfile'}"
    assert registry.get("pumps").version == 1  # nothing registered without a server


def test_ollama_q4_k_m_is_left_to_ollama_create_from_the_checked_f16_gguf(registry, tmp_path):
    result = export_specialist("pumps", "ollama", quantize="q4_k_m", out=tmp_path / "o", registry=registry, create=False)
    assert "pumps-v1-f16.gguf" in result.files
    assert result.commands[0].startswith("ollama create pumps --quantize q4_K_M -f ")


def test_ollama_template_translation_is_judged_by_rendering(models):
    from transformers import AutoTokenizer

    from training.models import PLAIN_CHAT_TEMPLATE, SCRATCH_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(models.base)
    assert ollama_template(tokenizer, "t") == (CHATML_GO_TEMPLATE, None)
    tokenizer.chat_template = SCRATCH_CHAT_TEMPLATE  # with {% generation %} markers: renders the same
    assert ollama_template(tokenizer, "t")[1] is None
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou help.<|im_end|>\n' }}"
                               "{% endif %}" + SCRATCH_CHAT_TEMPLATE)  # a Qwen-style default system turn
    assert ollama_template(tokenizer, "t") == (CHATML_GO_TEMPLATE, "You help.")
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    with pytest.raises(AtelierError, match="not ChatML.*TEMPLATE by hand"):
        ollama_template(tokenizer, "t")


def test_ollama_adapter_route_for_a_base_ollama_knows(registry, models, tmp_path):
    import shutil

    base = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B-Instruct" / "snapshots" / "0"  # a hub cache path
    shutil.copytree(models.base, base)
    registry.register("pumps", base_model=str(base), adapter_dir=models.adapter, eval_report=EVAL_REPORT)
    export_specialist("pumps", "ollama", out=tmp_path / "o", registry=registry, create=False)
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    assert modelfile == "FROM llama3.2:1b\nADAPTER ./adapter\nPARAMETER num_ctx 256\n"  # the rest from Ollama's base
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def fake_ollama(monkeypatch):
    """A stand-in for Ollama's HTTP API (no Ollama can be installed here): /api/version, blob uploads and
    /api/create, recorded, so the client calls and the served_by registration run for real."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200 if self.path != "/api/none" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            calls.append(("GET", self.path, b""))
            self._reply({"version": "0.12.0"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append(("POST", self.path, body))
            self._reply({"status": "success"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("OLLAMA_HOST", url)
    yield SimpleNamespace(url=url, calls=calls)
    server.shutdown()


def test_with_a_reachable_ollama_the_model_is_created_and_registered_as_served(registry, tmp_path, fake_ollama):
    import hashlib

    result = export_specialist("pumps", "ollama", out=tmp_path / "o", registry=registry)

    gguf_file = tmp_path / "o" / "pumps-v1-f16.gguf"
    digest = "sha256:" + hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    paths = [(method, path) for method, path, _ in fake_ollama.calls]
    assert paths == [("GET", "/api/version"), ("POST", f"/api/blobs/{digest}"), ("POST", "/api/create")]
    create = json.loads(fake_ollama.calls[-1][2])
    assert create["model"] == "pumps" and create["files"] == {"pumps-v1-f16.gguf": digest}
    assert create["template"] == CHATML_GO_TEMPLATE
    assert create["parameters"] == {"stop": ["<|im_end|>", "<|im_start|>"], "num_ctx": 256}
    assert result.served_by == f"ollama:pumps@{fake_ollama.url}"
    record = registry.get("pumps")
    assert (record.version, record.served_by) == (2, result.served_by)
    assert record.adapter_sha256 == registry.get("pumps", 1).adapter_sha256


@pytest.mark.ollama
@pytest.mark.skipif(not os.environ.get("OLLAMA_HOST"), reason="needs a live Ollama server at OLLAMA_HOST")
def test_live_ollama_creates_the_model_and_registers_served_by(registry, tmp_path):
    from specialists.served import OllamaBackend

    result = export_specialist("pumps", "ollama", out=tmp_path / "o", registry=registry, create=True)
    assert result.served_by and result.served_by.startswith("ollama:pumps")
    record = registry.get("pumps")
    assert record.version == 2 and record.served_by == result.served_by
    assert OllamaBackend("pumps", os.environ["OLLAMA_HOST"], num_ctx=256).generate(ASK).finish_reason


# ----------------------------------------------------------------------------- vLLM and the CLI


def test_vllm_layout_and_serve_command(registry, models, tmp_path):
    out = tmp_path / "vllm"
    result = export_specialist("pumps", "vllm", out=out, registry=registry)

    assert {"adapter_config.json", "adapter_model.safetensors", "SERVE.md", "README.md"} <= set(result.files)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(models.base) and config["r"] == 4
    serve = (f"vllm serve {models.base} --enable-lora --lora-modules pumps={out} --max-lora-rank 8 "
             "--max-model-len 256")
    assert result.commands[0] == serve and serve in (out / "SERVE.md").read_text()
    assert '/v1/load_lora_adapter' in result.commands[1] and f'"lora_path": "{out}"' in result.commands[1]
    assert front_matter(out / "README.md")["library_name"] == "peft"


def test_importing_the_export_module_loads_no_torch_numpy_or_gguf():
    import subprocess
    import sys

    code = ("import sys, specialists.export.cli; heavy = {'torch', 'numpy', 'gguf', 'transformers'} & set(sys.modules); "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_vllm_export_carries_the_adapters_tokenizer_only_when_its_vocabulary_differs(registry, models, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    assert "tokenizer.json" not in export_specialist("pumps", "vllm", out=tmp_path / "same", registry=registry).files
    adapter = tmp_path / "adapter-with-tokens"
    shutil.copytree(models.adapter, adapter)
    tokenizer = AutoTokenizer.from_pretrained(models.base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(adapter)
    registry.register("tooly", base_model=str(models.base), adapter_dir=adapter, eval_report=EVAL_REPORT)
    result = export_specialist("tooly", "vllm", out=tmp_path / "more", registry=registry)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)


def test_cli_export_prints_files_parity_and_next_commands(registry, tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("noop")(lambda: None)  # a group with two commands keeps `export` as a subcommand
    register_export(app)
    ok = CliRunner().invoke(app, ["export", "pumps", "--to", "vllm", "--out", str(tmp_path / "v")])
    assert ok.exit_code == 0, ok.output
    assert "exported pumps v1 to vllm" in ok.output and "parity: 5 prompts" in ok.output
    assert "vllm serve" in ok.output
    bad = CliRunner().invoke(app, ["export", "pumps", "--to", "gguf", "--quantize", "q4_k_m"])
    assert isinstance(bad.exception, AtelierError) and "llama-quantize" in str(bad.exception)
