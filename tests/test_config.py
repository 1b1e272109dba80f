"""atelier/config.py and `atelier config show`: one source for defaults, help and types; shipped configs that load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field
from typer.testing import CliRunner

from atelier.cli import app
from atelier.config import config_field, config_yaml, load_config
from atelier.config_cli import ConfigKind, config_class, default_config_yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "examples" / "configs"
ES_ENV = (
    "ELASTICSEARCH_URL",
    "ELASTICSEARCH_API_KEY",
    "ELASTICSEARCH_USERNAME",
    "ELASTICSEARCH_PASSWORD",
    "ELASTICSEARCH_CA_CERTS",
)


@pytest.fixture
def no_es_env(monkeypatch):
    for name in ES_ENV:
        monkeypatch.delenv(name, raising=False)


class Captured(Exception):
    """Raised by a stand-in for the work a command starts, once it holds the config the command built."""


def capture(monkeypatch, target: str, seen: list):
    """Replace `target` (module.attr) by a function that records the config it is given, then stops the command."""

    def grab(*args, **kwargs):
        seen.append(next(a for a in (*args, *kwargs.values()) if hasattr(a, "model_fields")))
        raise Captured

    monkeypatch.setattr(target, grab)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ----------------------------------------------------------------------------- shipped files and `config show`


@pytest.mark.parametrize("kind", list(ConfigKind), ids=lambda k: k.value)
def test_every_shipped_config_loads_and_is_what_config_show_prints(kind, no_es_env):
    path = SHIPPED / f"{kind.value}.yaml"
    cls = config_class(kind)
    assert load_config(cls, path) == cls()  # through the loader --config uses: every key known, every value valid
    shown = invoke("config", "show", kind.value)
    assert shown.exit_code == 0, shown.output
    assert path.read_text(encoding="utf-8") == shown.stdout == default_config_yaml(kind), (
        f"{path} is out of date: run `make configs`"
    )


def test_no_other_file_ships_unchecked():
    assert sorted(p.stem for p in SHIPPED.glob("*.yaml")) == sorted(k.value for k in ConfigKind)


def test_config_show_comments_every_field_with_its_description(no_es_env):
    from retrieval.fusion import FusionConfig

    text = default_config_yaml(ConfigKind.index)
    lines = text.splitlines()
    at = lines.index("  alpha: 0.5")
    assert lines[at - 1] == f"  # {FusionConfig.model_fields['alpha'].description}"
    assert yaml.safe_load(text)["fusion"] == {"method": "convex", "alpha": 0.5, "rrf_k": 60, "candidates": 100}


def test_environment_defaults_are_commented_out_and_secrets_never_written(monkeypatch):
    monkeypatch.setenv("ELASTICSEARCH_URL", "https://cluster.internal:9200")
    monkeypatch.setenv("ELASTICSEARCH_API_KEY", "s3cr3t-key-value")
    text = default_config_yaml(ConfigKind.index)
    assert "s3cr3t-key-value" not in text
    assert "  # url: https://cluster.internal:9200  (from $ELASTICSEARCH_URL when it is set)" in text
    assert "url" not in yaml.safe_load(text)["elasticsearch"]  # a copy of the file does not pin the cluster


def test_seeds_that_follow_the_run_seed_are_left_out_so_a_copy_can_change_it(tmp_path, no_es_env):
    text = default_config_yaml(ConfigKind.specialist)
    loaded = yaml.safe_load(text)
    assert "seed" in loaded and all("seed" not in loaded[part] for part in ("data", "dapt", "sft", "dpo"))
    copy = tmp_path / "specialist.yaml"
    copy.write_text(text.replace("\nseed: 0\n", "\nseed: 4\n"), encoding="utf-8")
    config = load_config(config_class(ConfigKind.specialist), copy)
    assert (config.seed, config.data.seed, config.dapt.seed, config.sft.seed, config.dpo.seed) == (4, 4, 4, 4, 4)


def test_config_yaml_renders_values_yaml_reads_back():
    from atelier.config import StrictModel

    class Part(StrictModel):
        words: list[str] = Field(["a: b", "#not a comment", "yes"], description="Strings YAML would misread bare.")

    class Whole(StrictModel):
        """A test config."""

        part: Part = Field(default_factory=Part, description="A section.")
        ratio: float | None = Field(None, description="Unset.")

    text = config_yaml(Whole(), "A header")
    assert text.startswith("# A header\n") and "  # Strings YAML would misread bare.\n" in text
    assert Whole.model_validate(yaml.safe_load(text)) == Whole()


def test_an_unknown_kind_is_a_usage_error():
    result = invoke("config", "show", "router")
    assert result.exit_code == 2 and "router" in result.output


# ----------------------------------------------------------------------------- options derived from fields


def test_help_is_the_fields_description_with_its_default_and_key(monkeypatch):
    from agents.config import ServeConfig
    from retrieval.config import RetrievalConfig

    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    serve = invoke("serve", "--help")
    port = ServeConfig.model_fields["port"]
    assert f"{port.description} [default: {port.default}; config: port]" in serve.stdout
    index = invoke("index", "--help")
    info, default = config_field(RetrievalConfig, "documents.max_file_mb")
    assert f"{info.description} [default: {default}; config: documents.max_file_mb]" in index.stdout
    assert "embedded|elasticsearch" in index.stdout  # the Enum's choices as the metavar
    assert "--embedding-model" in index.stdout and "--model " not in index.stdout  # the old name is hidden


def test_every_command_renders_its_help(monkeypatch):
    """Help is rich markup: a description with [brackets] must not break it (it did for `specialist add`)."""
    import typer.main

    def commands(group, path=()):
        for name, command in getattr(group, "commands", {}).items():
            yield from commands(command, (*path, name)) if hasattr(command, "commands") else [(*path, name)]

    names = list(commands(typer.main.get_command(app)))
    assert ("specialist", "add") in names and ("config", "show") in names and len(names) > 12
    for name in names:
        result = invoke(*name, "--help")
        assert result.exit_code == 0, (name, result.output, result.exception)


def test_a_malformed_environment_default_breaks_no_help_and_config_show_names_it(monkeypatch):
    from agents.config import OrchestratorConfig
    from atelier.errors import AtelierError

    monkeypatch.setenv("ELASTICSEARCH_URL", "not a url")
    assert config_field(OrchestratorConfig, "retrieval.index")[1] == "default"
    assert invoke("index", "--help").exit_code == 0
    with pytest.raises(AtelierError, match="set ELASTICSEARCH_URL"):
        default_config_yaml(ConfigKind.index)


def test_a_field_without_a_description_cannot_become_an_option():
    from atelier.config import StrictModel, config_option

    class Bare(StrictModel):
        size: int = 3

    with pytest.raises(ValueError, match=r"Bare.size has no description"):
        config_option(Bare, "size", "--size")
    with pytest.raises(KeyError, match="no field 'nope'"):
        config_option(Bare, "nope", "--nope")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["serve", "--port", "70000"], "--port"),
        (["search", "x", "--index", "Bad Name!"], "--index"),
        (["index", "x", "--backend", "sqlite"], "--backend"),
        (["index", "x", "--max-file-mb", "0"], "--max-file-mb"),
        (["specialist", "add", "x", "--docs", ".", "--stages", "sft,rlhf"], "--stages"),
    ],
)
def test_a_bad_value_is_refused_by_the_fields_own_type_naming_the_flag(args, flag):
    result = invoke(*args)
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- precedence: defaults < --config < CLI


def test_specialist_add_precedence_and_seed(tmp_path, monkeypatch):
    seen: list = []
    capture(monkeypatch, "training.pipeline.run_pipeline", seen)
    config_file = tmp_path / "s.yaml"
    config_file.write_text(
        "base: scratch:tiny\nseed: 5\nstages: [sft, dpo]\nevaluate_stages: true\ndpo: {beta: 0.3}\n", encoding="utf-8"
    )
    base_args = ["specialist", "add", "x", "--docs", str(tmp_path)]
    for args in (
        [],
        ["--config", str(config_file)],
        [
            "--config",
            str(config_file),
            "--seed",
            "9",
            "--stages",
            "dapt,sft",
            "--no-evaluate-stages",
            "--preference",
            "kto",
        ],
    ):
        assert isinstance(invoke(*base_args, *args).exception, Captured)
    default, from_file, from_cli = seen
    assert (default.base, default.seed, default.stages, default.evaluate_stages) == (
        "smollm2-135m",
        0,
        ["dapt", "sft", "dpo"],
        False,
    )
    assert (from_file.base, from_file.seed, from_file.stages, from_file.evaluate_stages, from_file.dpo.beta) == (
        "scratch:tiny",
        5,
        ["sft", "dpo"],
        True,
        0.3,
    )
    assert (
        from_cli.base,
        from_cli.seed,
        from_cli.stages,
        from_cli.evaluate_stages,
        from_cli.dpo.beta,
        from_cli.dpo.preference,
    ) == ("scratch:tiny", 9, ["dapt", "sft"], False, 0.3, "kto")
    assert (from_cli.data.seed, from_cli.dapt.seed, from_cli.sft.seed, from_cli.dpo.seed) == (9, 9, 9, 9)


def test_serve_precedence(tmp_path, monkeypatch):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(
        "host: 0.0.0.0\nport: 8100\norchestrator: {model: {name: 'ollama:x'}, search_k: 3}\n", encoding="utf-8"
    )
    monkeypatch.delenv("ATELIER_API_KEYS", raising=False)
    # the real exposure check: the host it refuses is the one that won
    assert "refusing to listen on 0.0.0.0" in str(invoke("serve", "--config", str(config_file)).exception)
    assert "refusing to listen on 192.0.2.7" in str(
        invoke("serve", "--config", str(config_file), "--host", "192.0.2.7").exception
    )
    seen: list = []
    capture(monkeypatch, "agents.api.create_app", seen)
    for args in (
        [],
        ["--config", str(config_file), "--host", "127.0.0.1"],
        ["--config", str(config_file), "--host", "127.0.0.1", "--port", "0", "--model", "ollama:y"],
    ):
        assert isinstance(invoke("serve", *args).exception, Captured)
    default, from_file, from_cli = seen
    assert (default.port, default.orchestrator.model.name) == (8000, None)
    assert (from_file.port, from_file.orchestrator.model.name, from_file.orchestrator.search_k) == (8100, "ollama:x", 3)
    assert (from_cli.port, from_cli.orchestrator.model.name, from_cli.orchestrator.search_k) == (0, "ollama:y", 3)


def test_ask_precedence(tmp_path, monkeypatch):
    seen: list = []
    capture(monkeypatch, "agents.orchestrator.Orchestrator", seen)
    config_file = tmp_path / "o.yaml"
    config_file.write_text("model: {name: 'ollama:x'}\nretrieval: {index: manuals}\n", encoding="utf-8")
    for args in ([], ["--config", str(config_file)], ["--config", str(config_file), "--index", "other"]):
        assert isinstance(invoke("ask", "hi", *args).exception, Captured)
    default, from_file, from_cli = seen
    assert (default.model.name, default.retrieval.index) == (None, "default")
    assert (from_file.model.name, from_file.retrieval.index) == ("ollama:x", "manuals")
    assert (from_cli.model.name, from_cli.retrieval.index) == ("ollama:x", "other")


def test_chat_names_the_model_that_came_from_the_config(tmp_path, monkeypatch):
    class Orchestrator:  # stands in for the graph: what chat prints before the first question
        def __init__(self, config):
            self.model_name, self.router_only = config.model.name, config.model.name is None

        def close(self):
            pass

    monkeypatch.setattr("agents.orchestrator.Orchestrator", Orchestrator)
    config_file = tmp_path / "o.yaml"
    config_file.write_text("model: {name: 'ollama:qwen2.5:7b'}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["chat", "--config", str(config_file)], input="/exit\n")
    assert result.exit_code == 0, result.output
    assert "model ollama:qwen2.5:7b" in result.stdout and "None" not in result.stdout


def test_search_takes_embedding_model_and_the_old_model_flag_with_a_warning(tmp_path, monkeypatch):
    seen: list = []
    capture(monkeypatch, "retrieval.config.Searcher.open", seen)
    config_file = tmp_path / "r.yaml"
    config_file.write_text("embedding: {model: /models/file-one}\nindex: docs\n", encoding="utf-8")
    runs = [
        invoke("search", "q", "--config", str(config_file)),
        invoke("search", "q", "--config", str(config_file), "--embedding-model", "/models/cli"),
        invoke("search", "q", "--model", "/models/old-flag"),
    ]
    assert all(isinstance(run.exception, Captured) for run in runs)
    assert [c.embedding.model for c in seen] == ["/models/file-one", "/models/cli", "/models/old-flag"]
    assert seen[1].index == "docs"
    assert "deprecated" not in runs[1].stderr
    assert "`atelier search --model` is deprecated" in runs[2].stderr and "--embedding-model" in runs[2].stderr
    clash = invoke("search", "q", "--model", "a", "--embedding-model", "b")
    assert "name different embedding models" in str(clash.exception)


def test_runtime_keys_of_older_serve_configs_move_into_the_runtime_with_a_warning(tmp_path, caplog):
    from agents.config import ServeConfig

    old = tmp_path / "serve.yaml"
    old.write_text("max_tokens_cap: 77\norchestrator: {max_bases: 3}\n")
    config = load_config(ServeConfig, old)
    assert (config.orchestrator.runtime.max_tokens_cap, config.orchestrator.runtime.max_bases) == (77, 3)
    assert "max_bases has moved to orchestrator.runtime.max_bases" in caplog.text
    assert "max_tokens_cap (serve) has moved" in caplog.text
    both = ServeConfig.model_validate({"max_tokens_cap": 77, "orchestrator": {"runtime": {"max_tokens_cap": 99}}})
    assert both.orchestrator.runtime.max_tokens_cap == 99  # the key in its new place wins
