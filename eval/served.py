"""One chat completion from a served model: the single place `eval` reaches a model server.

Everything goes through Atelier's model-server layer (`atelier.servers`): the one parser
(`provider:model`, optionally `@URL`), the one config, and the official clients —
`llamacpp:NAME` runs llama.cpp in this process, `ollama:` speaks Ollama's own API (with
`num_ctx`, which Ollama would otherwise truncate to silently), `openai:` any OpenAI-compatible
server. Served models return text only, so they answer the open questions of an exam.
"""

from __future__ import annotations

from functools import lru_cache

from atelier.errors import AtelierError


@lru_cache(maxsize=8)
def _endpoint(spec: str):
    from atelier.servers import ServerConfig, endpoint, probe

    config = ServerConfig(name=spec)
    ep = endpoint(config)
    problem = None if ep.embedded else probe(ep)
    if problem:
        raise AtelierError(f"--against {spec}: {problem}; start the server or fix its URL (provider:model@URL)")
    return ep, config


def served_chat(spec: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The greedy (temperature 0) answer of the served model `spec` to `messages`."""
    from atelier.servers import ollama_client, openai_client

    ep, config = _endpoint(spec)
    if ep.wire == "ollama":
        reply = ollama_client(ep, timeout=config.timeout_s).chat(
            model=ep.model, messages=messages,
            options={"temperature": 0, "num_predict": max_tokens, "num_ctx": config.num_ctx})
        return (reply["message"]["content"] or "").strip()
    import openai

    try:
        reply = openai_client(ep, timeout=config.timeout_s, max_retries=config.max_retries).chat.completions.create(
            model=ep.model, messages=messages, max_tokens=max_tokens, temperature=0,
            **({"stop": list(ep.stop)} if ep.stop else {}))
    except openai.APIConnectionError:
        raise AtelierError(f"no model server reachable for {spec} at {ep.base_url}; start it or fix its URL") from None
    except openai.APIStatusError as exc:
        raise AtelierError(f"{spec} refused the request ({exc.status_code}: {exc.message})") from None
    return (reply.choices[0].message.content or "").strip()
