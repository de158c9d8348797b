"""Keep secrets out of everything qlorax writes: audit log, env.json, logs, reports, console.

Two mechanisms, because secrets reach us two ways:

* `redact(obj)` replaces the *values* of secret-looking keys in a config/report structure
  (and scrubs every string in it), so a structure can be recorded without its secrets.
* `scrub_text(text)` replaces every *known secret value* wherever it occurs in free text:
  values registered with `register_secret` / `read_token_file`, and the values of
  secret-looking environment variables (HF_TOKEN, HUGGINGFACE_TOKEN, WANDB_API_KEY, ...).

The key rule (`is_secret_key`), applied to the key split into lower-case words at
`_`, `-`, `.`, spaces and camelCase boundaries (e.g. "hfApiToken" -> hf, api, token):

1. a *strong* word anywhere makes it secret: password, passwd, passphrase, secret,
   secrets, credential, credentials, private_key, privatekey, authorization, cookie;
2. otherwise the *last* word decides (the head noun: "token_file" is a path, "key_count"
   a count, "max_tokens" a number): it is secret when it is token, key, auth, apikey,
   accesstoken, authtoken, pat or bearer -- or a single word ending in token/apikey/secret
   (e.g. "hftoken") but not one merely containing them ("tokenizer", "tokens");
3. except the tokenizer vocabulary and non-secret keys: "pad_token", "eos_token", ...
   (`_TOKENIZER_TOKEN_WORDS`) and "cache_key", "sort_key", "public_key", ...
   (`_NON_SECRET_KEY_QUALIFIERS`).

Redaction fails safe: when unsure, a value is redacted. Values that cannot carry a secret
(None, booleans) are left as they are, so `use_auth_token: true` stays readable.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.errors import ConfigError

REDACTED = "***REDACTED***"

# Shorter values are not scrubbed from free text: a secret-named variable holding "1" or
# "true" (HF_HUB_DISABLE_IMPLICIT_TOKEN=1) would otherwise erase every "1" in a log.
MIN_SCRUB_LENGTH = 4
_NOT_SECRET_VALUES = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off"})

_STRONG_WORDS = frozenset(
    "password passwd passphrase secret secrets credential credentials privatekey authorization cookie".split()
)
_HEAD_WORDS = frozenset({"token", "key", "auth", "apikey", "accesstoken", "authtoken", "pat", "bearer"})
_COMPOUND_SUFFIXES = ("token", "apikey", "secret", "password", "passwd")
# "pad_token: <pad>" in a tokenizer config is vocabulary, not a credential.
_TOKENIZER_TOKEN_WORDS = frozenset(
    "pad eos bos unk mask sep cls start end special additional chat image audio video eot eom "
    "fim next max min num first last prefix suffix middle".split()
)
# "cache_key", "sort_key", ... name keys of a mapping or digests, not credentials.
_NON_SECRET_KEY_QUALIFIERS = frozenset(
    "cache sort primary foreign partition group dict map lookup column field text label "
    "prompt response input output target metric dataset data join hash index public message "
    "instruction context answer question image id name config state row record".split()
)

_WORD_SPLIT = re.compile(r"[^0-9a-zA-Z]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Credentials in URLs: https://user:hunter2@host/ keeps the user and loses the password;
# https://TOKEN@host/ (a token as the user name, as git remotes and hub endpoints take it)
# loses the whole user part.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<pw>[^\s@/]+)@")
_URL_USER_ONLY = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s:/@]+)@")
# The environment variables that hold a Hugging Face token (the values a config must never contain).
HF_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_lock = threading.Lock()
_registered: set[str] = set()

log = logging.getLogger("qlorax.secrets")


def _words(key: str) -> list[str]:
    return [w for w in _WORD_SPLIT.split(_CAMEL.sub("_", key).lower()) if w]


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key / variable name names a secret (rule in the module docstring)."""
    if not isinstance(key, str):
        return False
    words = _words(key)
    if not words:
        return False
    joined = "".join(words)
    if any(w in _STRONG_WORDS for w in words) or "privatekey" in joined:
        return True
    last = words[-1]
    previous = words[-2] if len(words) > 1 else None
    if last == "token" and previous in _TOKENIZER_TOKEN_WORDS:
        return False
    if last == "key" and previous in _NON_SECRET_KEY_QUALIFIERS:
        return False
    if last in _HEAD_WORDS:
        return True
    # a run-together word such as "hftoken" or "openaiapikey" (but not "tokenizer")
    return len(words) == 1 and last.endswith(_COMPOUND_SUFFIXES) and last not in ("tokens",)


def _worth_scrubbing(value: str) -> bool:
    value = value.strip()
    return len(value) >= MIN_SCRUB_LENGTH and value.lower() not in _NOT_SECRET_VALUES


def register_secret(value: str | None) -> None:
    """Remember a secret value so that `scrub_text` removes it from any text from now on."""
    if value is None:
        return
    value = str(value).strip()
    if _worth_scrubbing(value):
        with _lock:
            _registered.add(value)


def registered_secrets() -> list[str]:
    """The registered values (for the scrubbers; never print this)."""
    with _lock:
        return list(_registered)


def clear_registered_secrets() -> None:
    """Forget registered values (tests; a long-lived process switching identities)."""
    with _lock:
        _registered.clear()


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables long enough to scrub (for scrubbers; never print)."""
    environ = settings.environ() if environ is None else environ
    values = {v.strip() for k, v in environ.items() if is_secret_key(k) and isinstance(v, str)}
    return sorted(v for v in values if _worth_scrubbing(v))


def _known_secrets() -> list[str]:
    # Longest first, so that a secret containing another is replaced whole.
    return sorted(set(registered_secrets()) | set(secret_env_values()), key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
        text = _URL_USER_ONLY.sub(lambda m: m[0] if m["user"] == REDACTED else f"{m['scheme']}{REDACTED}@", text)
    return text


def scrub_text(text: str) -> str:
    """Replace every registered secret, every secret env value and URL passwords with ***REDACTED***."""
    if not text:
        return text
    return _scrub(text, _known_secrets())


def _redact(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if is_secret_key(key) and value is not None and not isinstance(value, bool) and value != "":
                out[key] = REDACTED
            else:
                out[key] = _redact(value, secrets)
        return out
    if isinstance(obj, list | tuple):
        return [_redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return _scrub(obj, secrets)
    return copy.deepcopy(obj)


def redact(obj: Any) -> Any:
    """A deep copy of `obj` with secret-keyed values replaced and known secrets scrubbed from strings.

    Tuples become lists (the result is meant for JSON)."""
    return _redact(obj, _known_secrets())


def read_token_file(path: str | os.PathLike[str]) -> str:
    """Read a token from a file (whitespace stripped) and register it, so it is scrubbed everywhere.

    Files are how trusted systems hand over secrets (Kubernetes secret volumes, Docker
    secrets); unlike environment variables they are not inherited by every child process
    nor shown by `ps e`. A file readable by group/others is used but warned about."""
    path = Path(path)
    try:
        info = path.stat()
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path} cannot be read: {exc.__class__.__name__}") from None
    token = raw.strip()
    if not token:
        raise ConfigError(f"token file {path} is empty")
    if "\n" in token:
        raise ConfigError(f"token file {path} holds more than one line; expected a single token")
    if stat.S_ISREG(info.st_mode) and info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "token file %s is readable by group/others (mode %o); chmod 600 it", path, info.st_mode & 0o777
        )
    register_secret(token)
    return token



def keys_holding_secrets(obj: Any, prefix: str = "", environ: Mapping[str, str] | None = None) -> list[str]:
    """Dotted keys of `obj` whose string value contains a Hugging Face token (the value of
    HF_TOKEN / HUGGINGFACE_TOKEN, or a token read with `read_token_file`).

    A config is written into deterministic artifacts verbatim; redacting them would change
    their bits, so a config that holds a token is refused instead (the caller names the key)."""
    environ = settings.environ() if environ is None else environ
    tokens = {environ.get(name, "").strip() for name in HF_TOKEN_VARIABLES} | set(registered_secrets())
    tokens = {t for t in tokens if _worth_scrubbing(t)}
    if not tokens:
        return []

    def walk(value: Any, where: str) -> list[str]:
        if isinstance(value, Mapping):
            return [k for key, item in value.items() for k in walk(item, f"{where}.{key}" if where else str(key))]
        if isinstance(value, list | tuple):
            return [k for index, item in enumerate(value) for k in walk(item, f"{where}[{index}]")]
        if isinstance(value, str) and any(token in value for token in tokens):
            return [where]
        return []

    return walk(obj, prefix)
