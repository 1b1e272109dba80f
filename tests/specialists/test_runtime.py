"""The specialist runtime on tiny local models built here: a 2-layer Llama (hidden 64) with a
byte-level BPE tokenizer and a ChatML template, and LoRA adapters whose B weights are randomised
so that each specialist really answers differently. Offline; a few seconds in all."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from atelier.errors import AtelierError
from specialists import runtime as runtime_module
from specialists.generation import GenerationParams, StopFilter
from specialists.registry import Registry
from specialists.runtime import RuntimeConfig, SpecialistRuntime
from tests.tinymodels import ROOT, build_adapter, build_base, build_tokenizer

ASK = [{"role": "user", "content": "How do I bleed the hydraulic pump?"}]
GREEDY = GenerationParams(max_tokens=40)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer()
    base_a, base_b = build_base(root / "base-a", tokenizer, 0), build_base(root / "base-b", tokenizer, 1)
    return SimpleNamespace(base_a=base_a, base_b=base_b, alpha=build_adapter(base_a, root / "alpha", 1),
                           beta=build_adapter(base_a, root / "beta", 2), gamma=build_adapter(base_b, root / "gamma", 3),
                           delta=build_adapter(base_a, root / "delta", 4, targets=("k_proj", "o_proj", "down_proj")))


@pytest.fixture
def registry(models, tmp_path) -> Registry:
    """alpha and beta: adapters on base A; gamma: an adapter on base B; solo: base B as a full model."""
    registry = Registry(tmp_path / "home")
    for name, adapter, base in (("alpha", models.alpha, models.base_a), ("beta", models.beta, models.base_a),
                                ("gamma", models.gamma, models.base_b)):
        registry.register(name, base_model=str(base), adapter_dir=adapter, eval_report={}, force=True)
    registry.register("solo", base_model=str(models.base_b), model_dir=models.base_b, eval_report={}, force=True)
    return registry


def reference_text(base: Path, adapter: Path | None, max_tokens: int) -> str:
    """Greedy text of a fresh model with one adapter, by transformers' own generate()."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def streamed(runtime: SpecialistRuntime, name: str, params: GenerationParams, messages=ASK):
    stream = runtime.stream(name, messages, params)
    deltas = list(stream)
    return deltas, stream.generation


# ----------------------------------------------------------------------------- sharing and switching


def test_two_adapters_share_one_base_loaded_once(registry, models, monkeypatch):
    loads = []
    real_load = runtime_module._load_base
    monkeypatch.setattr(runtime_module, "_load_base", lambda *a: loads.append(a) or real_load(*a))
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))

    alpha, beta = runtime.generate("alpha", ASK, GREEDY), runtime.generate("beta", ASK, GREEDY)

    assert alpha.text != beta.text
    assert (alpha.specialist, alpha.version, beta.specialist) == ("alpha", 1, "beta")
    assert len(loads) == 1
    (only,) = runtime.loaded().values()
    assert only.adapters == {"alpha": 1, "beta": 1} and only.active_adapter == "beta"
    from transformers import AutoModelForCausalLM

    base_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(models.base_a).parameters())
    assert base_bytes < only.parameter_bytes < base_bytes * 1.5  # two small adapters on top of one base


def test_switching_back_and_forth_matches_fresh_single_adapter_models(registry, models):
    """delta adapts other layers than alpha and beta: switching must leave no adapter half-active.
    gamma-on-solo puts an adapter on solo's own model, so solo must then answer with adapters off."""
    registry.register("delta", base_model=str(models.base_a), adapter_dir=models.delta, eval_report={}, force=True)
    registry.register("gamma-on-solo", base_model=registry.get("solo").model_path, adapter_dir=models.gamma,
                      eval_report={}, force=True)
    expected = {name: reference_text(models.base_a, getattr(models, name), 40) for name in ("alpha", "beta", "delta")}
    expected |= {"solo": reference_text(models.base_b, None, 40),
                 "gamma-on-solo": reference_text(models.base_b, models.gamma, 40)}
    assert len(set(expected.values())) == 5
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    for name in ["alpha", "beta", "alpha", "alpha", "delta", "solo", "gamma-on-solo", "solo", "beta", "delta",
                 "gamma-on-solo", "alpha"]:
        assert runtime.generate(name, ASK, GREEDY).text == expected[name], name
    assert {path: set(b.adapters) for path, b in runtime.loaded().items()} == {
        str(models.base_a): {"alpha", "beta", "delta"}, registry.get("solo").model_path: {"gamma-on-solo"}}


def test_new_version_is_picked_up_and_replaces_the_adapter(registry, models):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    before, beta = runtime.generate("alpha", ASK, GREEDY), runtime.generate("beta", ASK, GREEDY)

    registry.register("alpha", base_model=str(models.base_a), adapter_dir=models.beta, eval_report={}, force=True)
    after = runtime.generate("alpha", ASK, GREEDY)

    assert (after.version, after.text) == (2, beta.text) and before.text != after.text
    (only,) = runtime.loaded().values()
    assert only.adapters == {"alpha": 2, "beta": 1}
    registry.rollback("alpha")
    assert runtime.generate("alpha", ASK, GREEDY).text == before.text


# ----------------------------------------------------------------------------- bases: LRU, full models, unload


def test_lru_unloads_the_least_recently_used_base(registry, models, monkeypatch):
    loads = []
    real_load = runtime_module._load_base
    monkeypatch.setattr(runtime_module, "_load_base", lambda path, device: loads.append(path) or real_load(path, device))
    runtime = SpecialistRuntime(registry, RuntimeConfig(max_bases=1, device="cpu"))

    first = runtime.generate("alpha", ASK, GREEDY)
    assert list(runtime.loaded()) == [str(models.base_a)]
    runtime.generate("solo", ASK, GREEDY)  # a full-model specialist: its own base
    assert list(runtime.loaded()) == [registry.get("solo").model_path]
    assert runtime.generate("alpha", ASK, GREEDY).text == first.text
    assert list(runtime.loaded()) == [str(models.base_a)]
    assert loads == [str(models.base_a), registry.get("solo").model_path, str(models.base_a)]

    two = SpecialistRuntime(registry, RuntimeConfig(max_bases=2, device="cpu"))
    for name in ("alpha", "gamma", "beta", "solo"):  # solo's model is a registry copy: a third base
        two.generate(name, ASK, GREEDY)
    assert list(two.loaded()) == [str(models.base_a), registry.get("solo").model_path]  # gamma's base B went


def test_unload_one_specialist_then_everything(registry, models):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    for name in ("alpha", "beta", "gamma"):
        runtime.generate(name, ASK, GREEDY)
    runtime.unload("gamma")  # the last specialist on base B: the base goes too
    assert list(runtime.loaded()) == [str(models.base_a)]
    runtime.unload("alpha")
    assert runtime.loaded()[str(models.base_a)].adapters == {"beta": 1}
    runtime.unload()
    assert runtime.loaded() == {}


# ----------------------------------------------------------------------------- stop sequences and limits


@pytest.mark.parametrize("stops,pushes,expected", [
    (["<END>"], ["Hello <E", "N", "D> more"], ["Hello ", "", ""]),            # split across deltas: held back
    (["<END>"], ["a <E", "X b"], ["a ", "<EX b"]),                             # a false start is released
    (["yy", "xyz"], ["ab xy", "z"], ["ab ", ""]),                              # the earliest stop wins
    (["STOP"], ["STOP now"], [""]),                                            # stop at the very start
])
def test_stop_filter_never_leaks_part_of_a_stop(stops, pushes, expected):
    f = StopFilter(stops)
    assert [f.push(p) for p in pushes] == expected
    assert f.stopped or f.flush() == ""


def test_stop_sequences_cut_output_streamed_and_not(registry):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    full = runtime.generate("alpha", ASK, GREEDY).text
    start = next(i for i in range(6, len(full) - 4) if "\ufffd" not in full[i:i + 4])
    stop = full[start:start + 4]
    expected = full[:full.index(stop)]
    params = GenerationParams(max_tokens=40, stop=[stop, "never-appears"])

    whole = runtime.generate("alpha", ASK, params)
    deltas, final = streamed(runtime, "alpha", params)

    assert whole.text == expected == "".join(deltas) == final.text
    assert whole.finish_reason == final.finish_reason == "stop"
    assert len(deltas) > 1 and all(deltas)  # really streamed, no empty deltas
    assert whole.usage == final.usage and whole.usage.completion_tokens < 40


def test_max_tokens_ends_with_length(registry):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    long = runtime.generate("alpha", ASK, GREEDY)
    assert long.usage.completion_tokens > 8  # precondition: no end of turn in the first 8 tokens
    short = runtime.generate("alpha", ASK, GenerationParams(max_tokens=8))
    deltas, final = streamed(runtime, "alpha", GenerationParams(max_tokens=8))
    assert short.finish_reason == final.finish_reason == "length"
    assert short.usage.completion_tokens == 8 and short.usage.prompt_tokens == long.usage.prompt_tokens > 0
    assert long.text.startswith(short.text) and short.text == "".join(deltas)


def test_limits_are_refused_with_a_fix(registry):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu", max_tokens_cap=64))
    with pytest.raises(AtelierError, match="cap of 64"):
        runtime.generate("alpha", ASK, GenerationParams(max_tokens=65))
    with pytest.raises(AtelierError, match="context of 256"):
        runtime.generate("alpha", [{"role": "user", "content": "word " * 400}], GREEDY)
    with pytest.raises(AtelierError, match="role"):
        runtime.generate("alpha", [{"text": "no role"}], GREEDY)


def test_seeded_sampling_is_reproducible(registry):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    params = GenerationParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    first, second = runtime.generate("beta", ASK, params), runtime.generate("beta", ASK, params)
    deltas, final = streamed(runtime, "beta", params)
    other = runtime.generate("beta", ASK, params.model_copy(update={"seed": 8}))
    assert first.text == second.text == "".join(deltas) == final.text
    assert other.text != first.text


# ----------------------------------------------------------------------------- threads


def test_concurrent_requests_match_sequential_runs(registry):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    expected = {n: runtime.generate(n, ASK, GREEDY).text for n in ("alpha", "beta")}

    def ask(i: int, name: str) -> list[str]:  # odd threads stream, even ones don't
        return ["".join(runtime.stream(name, ASK, GREEDY)) if i % 2 else runtime.generate(name, ASK, GREEDY).text
                for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        futures = {pool.submit(ask, i, name): name for i, name in enumerate(["alpha", "beta"] * 4)}
        for future, name in futures.items():
            assert future.result(timeout=60) == [expected[name]] * 3, name


def test_threads_on_two_bases_with_room_for_one(registry):
    """max_bases=1 and requests alternating between two bases: each waits for the other's base
    to become idle, unloads it, loads its own; every answer is still right."""
    expected = {n: SpecialistRuntime(registry, RuntimeConfig(device="cpu")).generate(n, ASK, GREEDY).text for n in ("alpha", "gamma")}
    runtime = SpecialistRuntime(registry, RuntimeConfig(max_bases=1, device="cpu"))

    def ask(name: str) -> list[str]:
        return ["".join(runtime.stream(name, ASK, GREEDY)) for _ in range(2)]

    with ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(ask, name): name for name in ("alpha", "gamma") * 2}
        for future, name in futures.items():
            assert future.result(timeout=60) == [expected[name]] * 2, name
    assert len(runtime.loaded()) == 1


def test_one_lock_per_base(registry, monkeypatch):
    """While alpha generates on base A, beta (same base) waits and gamma (base B) runs."""
    gate, inside = threading.Event(), threading.Event()
    real_decode = runtime_module.decode

    def slow_decode(*args, **kwargs):
        if threading.current_thread().name == "alpha-request":
            inside.set()
            assert gate.wait(20)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "decode", slow_decode)
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    for name in ("alpha", "beta", "gamma"):  # load everything first
        runtime.generate(name, ASK, GREEDY)
    done: dict[str, float] = {}

    def request(name: str) -> None:
        runtime.generate(name, ASK, GREEDY)
        done[name] = time.monotonic()

    threads = [threading.Thread(target=request, args=(n,), name=f"{n}-request") for n in ("alpha", "beta", "gamma")]
    threads[0].start()
    assert inside.wait(20)
    threads[1].start(), threads[2].start()
    threads[2].join(20)
    assert "gamma" in done and "beta" not in done  # gamma ran in parallel; beta waits for base A
    released = time.monotonic()
    gate.set()
    for t in threads[:2]:
        t.join(20)
    assert done["beta"] >= released and done["alpha"] >= released


def test_closing_a_stream_frees_the_base(registry):
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    with runtime.stream("alpha", ASK, GenerationParams(max_tokens=200)) as stream:
        first = next(stream)
    assert first
    assert runtime.generate("beta", ASK, GREEDY).text  # not blocked by the abandoned stream


# ----------------------------------------------------------------------------- errors and supply chain


def test_unknown_specialist_lists_known_ones(registry):
    with pytest.raises(AtelierError, match="alpha, beta, gamma, solo"):
        SpecialistRuntime(registry, RuntimeConfig(device="cpu")).generate("delta", ASK, GREEDY)


def test_pickle_adapter_is_refused(registry, models, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(models.alpha, folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    registry.register("pickled", base_model=str(models.base_a), adapter_dir=folder, eval_report={}, force=True)
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu"))
    with pytest.raises(AtelierError, match=r"pickle weights \(adapter_model.bin\).*safetensors only"):
        runtime.generate("pickled", ASK, GREEDY)
    assert runtime.loaded()[str(models.base_a)].adapters == {}


def test_tampered_adapter_is_refused(registry, models):
    import shutil

    record = registry.get("alpha")
    shutil.copyfile(models.beta / "adapter_model.safetensors", Path(record.adapter_path) / "adapter_model.safetensors")
    with pytest.raises(AtelierError, match="SHA-256"):
        SpecialistRuntime(registry, RuntimeConfig(device="cpu")).generate("alpha", ASK, GREEDY)


def test_importing_the_runtime_does_not_import_torch():
    code = "import sys, specialists.runtime, specialists.served; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_runtime_config_comes_from_the_serve_yaml(registry, tmp_path):
    """device, max_bases, the one max_tokens cap and the served window are set in the serve config file."""
    from agents.config import ServeConfig
    from atelier.config import load_config

    assert all(field.description for field in RuntimeConfig.model_fields.values())
    path = tmp_path / "serve.yaml"
    path.write_text("orchestrator:\n  runtime: {device: cpu, max_bases: 1, max_tokens_cap: 16, served_num_ctx: 1024}\n")
    config = load_config(ServeConfig, path).orchestrator.runtime
    assert config == RuntimeConfig(device="cpu", max_bases=1, max_tokens_cap=16, served_num_ctx=1024)
    runtime = SpecialistRuntime(registry, config)
    assert runtime.device == "cpu"
    with pytest.raises(AtelierError, match="cap of 16"):
        runtime.generate("alpha", ASK, GenerationParams(max_tokens=17))
    path.write_text("orchestrator:\n  runtime: {device: gpu}\n")
    with pytest.raises(AtelierError, match="orchestrator.runtime.device"):
        load_config(ServeConfig, path)
