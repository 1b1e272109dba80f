"""`atelier specialist export NAME --to ollama`: a Modelfile, and the model created in a reachable Ollama.

FROM an Ollama library base + ADAPTER when Ollama knows the base, else FROM a GGUF (Llama) or the
merged folder, with the chat template translated to Go syntax (ChatML only, judged by rendering).
The create flow uploads the files as blobs through the official client and registers a new
version `served_by: ollama:NAME`. Without a library base it builds on the gguf and merged targets.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atelier.errors import AtelierError
from atelier.home import atomic_write_text
from specialists.export.common import Staged, adapter_on_base, copy_adapter, hub_id, register_served
from specialists.export.gguf import write_gguf_target
from specialists.export.merged import write_merged
from specialists.export.parity import check_parity, torch_logits
from specialists.registry import Registry, SpecialistRecord

log = logging.getLogger("specialists.export")  # the export's one log

# Hugging Face ids of bases that Ollama's library serves and whose safetensors LoRA adapters its
# ADAPTER instruction imports (Llama, Mistral, Gemma families): HF id -> Ollama tag.
OLLAMA_BASES = {
    "meta-llama/llama-3.2-1b-instruct": "llama3.2:1b", "meta-llama/llama-3.2-3b-instruct": "llama3.2:3b",
    "meta-llama/llama-3.1-8b-instruct": "llama3.1:8b", "meta-llama/meta-llama-3.1-8b-instruct": "llama3.1:8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama3:8b", "mistralai/mistral-7b-instruct-v0.3": "mistral:7b",
    "google/gemma-2-2b-it": "gemma2:2b", "google/gemma-2-9b-it": "gemma2:9b"}
CHATML_GO_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                      "{{ end }}<|im_start|>assistant\n")
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"


@dataclass
class OllamaPlan:
    """The Modelfile, and the blobs the ollama client uploads for it (paths relative to the export)."""

    model: str
    source: str  # FROM: an Ollama library tag, ./FILE.gguf or ./merged
    files: list[str]
    adapters: list[str]
    template: str | None
    system: str | None
    stops: list[str]
    num_ctx: int
    quantize: str | None  # for `ollama create --quantize` (Ollama quantizes f16 weights itself)

    def modelfile(self) -> str:
        lines = [f"FROM {self.source}"] + (["ADAPTER ./adapter"] if self.adapters else [])
        lines += [f'TEMPLATE """{self.template}"""'] if self.template else []
        lines += [f'SYSTEM """{self.system}"""'] if self.system else []
        lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in self.stops] + [f"PARAMETER num_ctx {self.num_ctx}"]
        return "\n".join(lines) + "\n"

    def command(self, out_dir: Path) -> str:
        quantize = f" --quantize {self.quantize}" if self.quantize else ""
        return f"ollama create {self.model}{quantize} -f {out_dir / 'Modelfile'}"


def write_ollama(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """ADAPTER on an Ollama library base when Ollama knows the base, else FROM our GGUF (Llama) or merged folder."""
    ctx = model.config.max_position_embeddings
    if tag := ollama_base_tag(record):
        copy_adapter(record, folder / "adapter")
        parity = check_parity(probes, torch_logits(adapter_on_base(record, folder / "adapter")), "f32",
                              "Ollama adapter", tokenizer)
        staged = Staged(parity, card={"library_name": "peft", "tags": ["lora", "ollama"]})
        plan = OllamaPlan(record.name, tag, [], ["adapter/adapter_model.safetensors", "adapter/adapter_config.json"],
                          None, None, [], ctx, None)  # TEMPLATE and stops come with Ollama's base
    else:
        template, system = ollama_template(tokenizer, record.name)
        if getattr(model.config, "model_type", None) == "llama":  # our GGUF; Ollama makes q4_K_M from its f16
            ours, later = (quantize, None) if quantize in ("f32", "f16", "q8_0") else ("f16", quantize and "q4_K_M")
            staged = write_gguf_target(record, model, tokenizer, probes, folder, ours, out_dir, with_adapter=False)
            files = [p.name for p in folder.glob("*.gguf")]
            source = f"./{files[0]}"
        else:  # Ollama converts (and quantizes) safetensors of the architectures it knows
            ours, later = (quantize, None) if quantize in ("f32", "f16") else (None, {"q4_k_m": "q4_K_M"}.get(
                quantize or "", quantize))
            staged = write_merged(record, model, tokenizer, probes, folder / "merged", ours, out_dir / "merged")
            files, source = [f"merged/{p.name}" for p in sorted((folder / "merged").iterdir())], "./merged"
        plan = OllamaPlan(record.name, source, files, [], template, system, stop_strings(tokenizer),
                          ctx, later)
        staged.card["tags"] = [*staged.card.get("tags", []), "ollama"]
    atomic_write_text(folder / "Modelfile", plan.modelfile())
    staged.ollama, staged.commands = plan, [plan.command(out_dir), f"ollama run {record.name}"]
    return staged


def ollama_base_tag(record: SpecialistRecord) -> str | None:
    """The Ollama library tag of the adapter's base, when Ollama serves that base and imports its adapters."""
    return None if record.full_model else OLLAMA_BASES.get((hub_id(record.base_model) or "").lower())


_PROBE_CHATS = ([{"role": "user", "content": "Hi"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Bye"}])


def _chatml(messages: list[dict]) -> str:
    """What CHATML_GO_TEMPLATE renders for `messages` (Ollama adds no generation flag: it always ends open)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_template(tokenizer, name: str) -> tuple[str, str | None]:
    """(Go TEMPLATE, default SYSTEM) for a ChatML-family Jinja template, judged by what it renders.

    The Jinja template is rendered for a few conversations and must produce exactly what the Go
    template renders; a template that adds a fixed system turn when none is given becomes SYSTEM.
    Anything else is refused: a guessed template would silently change every answer.
    """
    defaults = set()
    for chat in _PROBE_CHATS:
        try:
            rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except Exception:
            rendered = None
        expected = _chatml(chat)
        extra = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", rendered[:-len(expected)], re.DOTALL) if (
            rendered and rendered.endswith(expected) and chat[0]["role"] != "system") else None
        if rendered != expected and extra is None:
            raise AtelierError(f"the chat template of {name!r} is not ChatML (<|im_start|>role ... <|im_end|>), the "
                               "family translated to Ollama's Go template syntax; export --to gguf and write the "
                               "Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)")
        if chat[0]["role"] != "system":
            defaults.add(extra.group(1) if extra else None)
    if len(defaults) > 1:
        raise AtelierError(f"the chat template of {name!r} adds a default system turn only sometimes; "
                           "write the Modelfile's TEMPLATE by hand")
    return CHATML_GO_TEMPLATE, defaults.pop()


def stop_strings(tokenizer) -> list[str]:
    """PARAMETER stop lines for a ChatML model: both turn markers, and its eos when that is another token."""
    stops = ["<|im_end|>", "<|im_start|>"]
    return stops + [t for t in (tokenizer.eos_token,) if t and t not in stops]


def _ollama_url() -> str:
    url = (os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL).strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def ollama_reachable(url: str) -> bool:
    """Does an Ollama server answer at `url`? (GET /api/version, 2 s.)"""
    import httpx

    log.info("probing Ollama at %s", url)
    try:
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def create_in_ollama(plan: OllamaPlan, out_dir: Path, url: str) -> None:
    """`ollama create` through the official client: upload each file as a blob, then create from digests."""
    import ollama

    log.info("creating model %s in Ollama at %s", plan.model, url)
    client = ollama.Client(host=url)
    try:
        files = {Path(f).name: client.create_blob(out_dir / f) for f in plan.files}
        adapters = {Path(f).name: client.create_blob(out_dir / f) for f in plan.adapters}
        client.create(model=plan.model, from_=None if plan.files else plan.source, files=files or None,
                      adapters=adapters or None, template=plan.template, system=plan.system, quantize=plan.quantize,
                      parameters={"stop": plan.stops, "num_ctx": plan.num_ctx})
    except (ollama.ResponseError, ConnectionError, OSError) as exc:
        raise AtelierError(f"the export in {out_dir} is complete, but Ollama at {url} could not create "
                           f"{plan.model!r} ({exc}); run `{plan.command(out_dir)}` yourself") from None


def maybe_create_in_ollama(registry: Registry, record: SpecialistRecord, out_dir: Path, plan: OllamaPlan,
                           create: bool | None, reachable: Callable[[str], bool]) -> str | None:
    """Create the model when asked (or when `reachable` finds a server) and register a version with served_by."""
    url = _ollama_url()
    if create is False or (create is None and not reachable(url)):
        return None
    create_in_ollama(plan, out_dir, url)
    served_by = f"ollama:{plan.model}" + ("" if url == DEFAULT_OLLAMA_URL else f"@{url}")
    register_served(registry, record, served_by)
    return served_by
