"""API keys: which callers the server accepts, and under which name each one owns its threads and feedback.

Keys come from three places, all checked when the server starts (a bad key stops it with a message
naming the key's place and the fix, never a silent pass):

    api_keys           plain keys in the ServeConfig YAML (each at least MIN_KEY_CHARS characters)
    ATELIER_API_KEYS   plain keys, comma-separated, in the environment
    api_keys_file      a YAML mapping NAME: sha256:HEX, so the server never stores the keys themselves

A plain key's owner name is `key-` + the first 12 hex digits of its SHA-256 (stable across restarts,
reveals nothing usable); a file key's owner is its name. Without any key the server runs
unauthenticated (loopback only) and every caller is the anonymous owner "".

    python -m agents.auth NAME     a new random key and its line for api_keys_file
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from atelier.errors import AtelierError

KEYS_ENV = "ATELIER_API_KEYS"
MIN_KEY_CHARS = 16
ANONYMOUS = ""
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NEW_KEY_HINT = "make one with `python -m agents.auth NAME`"


@dataclass(frozen=True)
class ApiKey:
    """An accepted key, by its SHA-256 only, and the owner name its threads and feedback are stored under."""

    owner: str
    sha256: bytes


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def check_plain_key(key: str, where: str) -> str:
    """`key` if it can be a key; an AtelierError naming `where` otherwise (blank, too short, odd characters)."""
    if not key.strip():
        raise AtelierError(f"{where} is blank; an empty key would let anyone in. Remove it, or {NEW_KEY_HINT}")
    if key != key.strip() or any(not 0x21 <= ord(c) <= 0x7E for c in key):
        raise AtelierError(f"{where} has spaces or characters outside printable ASCII; a Bearer key must be "
                           f"sent in an HTTP header as is. {NEW_KEY_HINT[0].upper()}{NEW_KEY_HINT[1:]}")
    if len(key) < MIN_KEY_CHARS:
        raise AtelierError(f"{where} has {len(key)} characters; a key needs at least {MIN_KEY_CHARS}, "
                           f"{NEW_KEY_HINT}")
    return key


def env_keys() -> list[str]:
    """Keys in ATELIER_API_KEYS (comma-separated; blanks between commas are skipped)."""
    raw = os.environ.get(KEYS_ENV, "")
    return [check_plain_key(k.strip(), f"{KEYS_ENV} key {i}")
            for i, k in enumerate(k for k in raw.split(",") if k.strip())]


def read_keys_file(path: Path) -> list[ApiKey]:
    """api_keys_file: a YAML mapping NAME: sha256:HEX (lowercase hex of the key's SHA-256)."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AtelierError(f"api_keys_file {path} not found; create it ({NEW_KEY_HINT} prints a line for it)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AtelierError(f"api_keys_file {path} is not readable YAML: {exc}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise AtelierError(f"api_keys_file {path} must be a mapping of NAME: sha256:HEX, one line per key "
                           f"({NEW_KEY_HINT})")
    keys = []
    for name, value in loaded.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise AtelierError(f"api_keys_file {path}: key name {name!r} must be 1-64 letters, digits, '.', '_' "
                               "or '-', starting with a letter or digit")
        match = _HASH.match(str(value).strip().lower()) if isinstance(value, str) else None
        if match is None:
            raise AtelierError(f"api_keys_file {path}: {name} must be sha256:HEX (64 hex digits), not the key "
                               f"itself; {NEW_KEY_HINT}")
        keys.append(ApiKey(name, bytes.fromhex(match.group(1))))
    return keys


def load_keys(plain: list[str], keys_file: Path | None) -> list[ApiKey]:
    """Every accepted key: the plain ones (config, then environment) and those of the keys file."""
    keys = [ApiKey(f"key-{digest(k).hex()[:12]}", digest(k)) for k in [*plain, *env_keys()]]
    if keys_file is not None:
        keys += read_keys_file(keys_file)
    seen: dict[bytes, str] = {}
    for key in keys:
        if key.sha256 in seen and seen[key.sha256] != key.owner:
            raise AtelierError(f"the same key is listed as {seen[key.sha256]!r} and {key.owner!r}; keep one")
        seen[key.sha256] = key.owner
    return list({k.sha256: k for k in keys}.values())


def owner_of(authorization: str, keys: list[ApiKey]) -> str | None:
    """The owner whose key is in an `Authorization: Bearer KEY` header; None when it matches none."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    presented = digest(token)
    found = None
    for key in keys:  # compare with every key, so the time taken does not tell which one nearly matched
        if hmac.compare_digest(presented, key.sha256):
            found = key.owner
    return found


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not _NAME.match(argv[0]):
        sys.exit("usage: python -m agents.auth NAME   (NAME: letters, digits, '.', '_' or '-')")
    key = f"atl-{secrets.token_urlsafe(32)}"
    print(f"key for {argv[0]} (give it to the client; it is not stored anywhere): {key}")
    print(f"line for api_keys_file:\n{argv[0]}: sha256:{digest(key).hex()}")


if __name__ == "__main__":
    main(sys.argv[1:])
