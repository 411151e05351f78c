"""Models by name: a preset, a local folder holding config.json, or a Hugging Face Hub id (ORG/NAME).

A Hub id's config.json comes from the local Hugging Face cache first (HF_HUB_CACHE, else HF_HOME/hub,
else ~/.cache/huggingface/hub: huggingface_hub's layout, read by huggingface_hub itself), and is
downloaded only when it is not cached and HF_HUB_OFFLINE is not set. Offline with no cached copy, the
answer is one line saying how to get the file. huggingface_hub is imported only for a Hub id, so presets
stay instant; a cached config answers in well under a second, torch never imported.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.models.hfconfig import config_json_path, load_config, printable_path
from lorabench.models.presets import PRESETS, from_name
from lorabench.models.raw import RawModel
from lorabench.models.spec import ModelSpec

Model = Union[ModelSpec, RawModel]  # a described model, or one the tracing engine answers for

# huggingface_hub's rule for a repository id: ORG/NAME, letters, digits, '-', '_', '.', no '--' or '..'.
HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TRUE = ("1", "on", "yes", "true")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name.strip()))


def resolve_model(name: str, traceable: bool = False) -> Model:
    """The model called name: a preset (case-insensitive), a local folder with a config.json (as
    transformers' from_pretrained takes it), or a Hub id. traceable: a model_type without a description is a
    RawModel (lorabench.models.raw) rather than an error.

    Raises:
        LorabenchError: none of those; an unknown name gets near presets suggested.
    """
    key = name.strip()
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    if is_local_model(key):
        return load_config(key, traceable=traceable)
    if is_hub_id(key):
        return load_hub_config(key, traceable)
    return from_name(key)


def distinct_specs(entries: Sequence[Tuple[object, str, ModelSpec]]) -> List[ModelSpec]:
    """The models of a report, each once and each under its own name.

    entries are (key, label, spec): entries with the same key (a preset named twice, one config file
    reached by two paths) are one model. Specs that share a name but not a key (two config folders
    called my-model, or a config folder called llama-3-8b beside the preset) take their label as name,
    so that rows, bench results and the folder name never mix them.
    """
    seen: Dict[object, Tuple[str, ModelSpec]] = {}
    for key, label, spec in entries:
        seen.setdefault(key, (label, spec))
    names = [spec.name for _, spec in seen.values()]
    return [replace(spec, name=label) if names.count(spec.name) > 1 and label != spec.name else spec
            for label, spec in seen.values()]


def resolve_specs(models: Sequence[str], configs: Sequence[str] = (), configs_first: bool = True,
                  traceable: bool = False) -> List[Model]:
    """The models named by --config paths and --model names (configs first, or last), each once and each under
    its own name: a config folder named like a preset (./tiny-llama beside tiny-llama), or two folders called
    my-model, are shown as 'tiny-llama (config tiny-llama)' (distinct_specs)."""
    def from_file(path: str):
        spec = load_config(path, traceable=traceable)
        file = os.path.realpath(config_json_path(path))
        shown = os.path.relpath(os.path.dirname(file) if file.endswith(os.sep + "config.json") else file)
        return ("config", file), f"{spec.name} (config {printable_path(shown)})", spec

    def named(name: str):
        spec = resolve_model(name, traceable)
        return ("model", spec.name), spec.name, spec

    files = [from_file(p) for p in configs]
    given = [from_file(m) if is_local_model(m) else named(m) for m in models]
    return distinct_specs(files + given if configs_first else given + files)


def is_local_model(name: str) -> bool:
    """name is a folder holding a config.json (and not a preset, which comes first)."""
    key = name.strip()
    return key.lower() not in PRESETS and os.path.isfile(os.path.join(key, "config.json"))


def _offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE), read now: huggingface_hub reads it once at import."""
    return any(os.environ.get(v, "").strip().lower() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cache_dir():
    """The hub cache as huggingface_hub finds it, read now (its constants are fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default, ~/.cache/huggingface/hub


def config_file(repo_id: str) -> str:
    """The path of repo_id's config.json in the local cache, downloaded there if needed and allowed.

    Raises:
        LorabenchError: in one line: no huggingface_hub, not cached while offline, no such (or a gated)
            repository, no config.json in it, or the Hub unreachable.
    """
    get = (f"download it where you are online (hf download {repo_id} config.json) or pass {option('config')} "
           "with the file")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise LorabenchError(f"{repo_id} is a Hugging Face Hub id; reading it needs huggingface_hub "
                             f"(pip install huggingface_hub), or pass {option('config')} with its "
                             "config.json.") from None
    cache = _cache_dir()
    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    except (errors.HFValidationError, ValueError):
        raise LorabenchError(f"'{repo_id}' is not a valid Hugging Face Hub id (ORG/NAME).") from None
    if isinstance(cached, str):
        return cached
    if cached is not None:  # the cache remembers the Hub saying there is none
        raise LorabenchError(f"{repo_id} has no config.json on the Hub (as cached); pass {option('config')}.")
    if _offline():
        raise LorabenchError(f"{repo_id}: config.json is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                             f"set; {get}.")
    # huggingface_hub retries a failed request five times over 23 s, a DNS failure included: with no network
    # the answer is one look-up away
    unresolved = _unresolved(huggingface_hub.constants.ENDPOINT)
    if unresolved:
        raise LorabenchError(f"cannot reach the Hugging Face Hub for {repo_id} ({unresolved}); {get}.")
    quiet = huggingface_hub.utils.logging.get_logger("huggingface_hub")
    level = quiet.level
    quiet.setLevel("ERROR")  # its retry warnings would make the one-line answer six
    try:
        return huggingface_hub.hf_hub_download(repo_id, "config.json", cache_dir=cache, etag_timeout=10)
    except errors.LocalEntryNotFoundError as exc:  # the Hub could not be reached (a subclass of the next)
        raise LorabenchError(f"cannot reach the Hugging Face Hub for {repo_id} ({_root_cause(exc)}); {get}.") from None
    except errors.GatedRepoError:
        raise LorabenchError(f"{repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login), "
                             f"or pass {option('config')} with its config.json.") from None
    except errors.RepositoryNotFoundError:
        raise LorabenchError(f"no model {repo_id} on the Hugging Face Hub (or it is private: log in with "
                             "hf auth login).") from None
    except (errors.EntryNotFoundError, getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)):
        raise LorabenchError(f"{repo_id} has no config.json on the Hub; pass {option('config')}.") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise LorabenchError(f"cannot fetch {repo_id}'s config.json from the Hugging Face Hub "
                             f"({_root_cause(exc)}); {get}.") from None
    finally:
        quiet.setLevel(level)


def _unresolved(endpoint: str, timeout_s: float = 5.0) -> Optional[str]:
    """Why endpoint's host has no address (no network, no DNS), found in at most timeout_s; None when it has
    one. The look-up runs in a thread: getaddrinfo has no timeout of its own."""
    import socket
    import threading
    from urllib.parse import urlsplit

    host = urlsplit(endpoint).hostname
    if not host:
        return None
    outcome: List[str] = []

    def look_up():
        try:
            socket.getaddrinfo(host, 443)
            outcome.append("")
        except OSError as exc:
            outcome.append(f"cannot resolve {host}: {exc.strerror or exc}")

    worker = threading.Thread(target=look_up, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return f"no DNS answer for {host} in {timeout_s:g} s"
    return outcome[0] or None


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost exception behind exc (a DNS failure, a timeout), shortened."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def load_hub_config(repo_id: str, traceable: bool = False) -> Model:
    """The spec of the Hub model repo_id, named after it (a RawModel, with traceable, where it is undescribed)."""
    spec = load_config(config_file(repo_id), where=f"{repo_id} (config.json)", traceable=traceable)
    return replace(spec, name=repo_id)
