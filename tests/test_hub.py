"""Models by Hub id (lorabench.models.hub): a cache laid out as huggingface_hub lays it out, in a temporary
folder; the network is never touched (offline runs set HF_HUB_OFFLINE, online ones replace the download)."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorabench.models import hub
from lorabench.cli import cli
from lorabench.models.hfconfig import load_config
from lorabench.estimator.params import count_base_params

errors = pytest.importorskip("huggingface_hub.errors")

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_with(root, repo_id, config):
    """root/models--ORG--NAME/{refs/main, snapshots/COMMIT/config.json}: huggingface_hub's cache layout."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    path = repo / "snapshots" / COMMIT / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("went online"))
    return tmp_path


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_a_cached_config_resolves_offline(offline_cache):
    path = cache_with(offline_cache, "Org/Tiny", TINY)
    res = run("params", "-m", "Org/Tiny", "--method", "lora", "-f", "json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[0]
    assert row["model"] == "Org/Tiny" and row["base_params"] == count_base_params(load_config(str(path)))
    # by hand: embeddings and head 2 x 100 x 64, per layer q,o 64x64, k,v 64x32, MLP 3 x 64x128, 2 norms; final norm
    assert row["base_params"] == 2 * 100 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_hf_home_locates_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_with(tmp_path / "hub", "Org/Tiny", TINY)
    assert hub.resolve_model("Org/Tiny").num_layers == 2


def test_offline_without_a_cached_copy_is_one_line(offline_cache):
    res = run("memory", "-m", "Qwen/Qwen3-8B")
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [
        "lorabench: error: Qwen/Qwen3-8B: config.json is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it where you are online (hf download Qwen/Qwen3-8B config.json) or pass --config with the file."]


def test_the_cache_remembering_no_config(offline_cache):
    cache_with(offline_cache, "Org/Tiny", TINY)
    (offline_cache / "models--Org--Tiny" / ".no_exist" / COMMIT).mkdir(parents=True)
    (offline_cache / "models--Org--Tiny" / ".no_exist" / COMMIT / "config.json").write_text("")
    (offline_cache / "models--Org--Tiny" / "snapshots" / COMMIT / "config.json").unlink()
    assert "Org/Tiny has no config.json on the Hub (as cached)" in run("params", "-m", "Org/Tiny").stderr


def test_config_errors_name_the_hub_id(offline_cache):
    cache_with(offline_cache, "Org/Bad", dict(TINY, hidden_size=-1))
    res = run("params", "-m", "Org/Bad")
    assert res.exit_code == 2 and "Org/Bad (config.json): 'hidden_size' must be an integer from 1" in res.stderr


def _hub_error(cls, message):
    """A huggingface_hub HTTP error without an HTTP response behind it."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


@pytest.mark.parametrize("error, message", [
    (lambda: _hub_error(errors.GatedRepoError, "403"), "is gated: accept its terms on huggingface.co"),
    (lambda: _hub_error(errors.RepositoryNotFoundError, "404"), "no model Org/Tiny on the Hugging Face Hub"),
    (lambda: _hub_error(errors.RemoteEntryNotFoundError, "404"), "Org/Tiny has no config.json on the Hub"),
    (lambda: errors.LocalEntryNotFoundError("cannot find"), "cannot reach the Hugging Face Hub for Org/Tiny"),
])
def test_online_failures_are_one_line(tmp_path, monkeypatch, error, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def download(*args, **kwargs):
        raise error()

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    monkeypatch.setattr(hub, "_unresolved", lambda endpoint: None)  # as if the Hub's name resolved
    res = run("params", "-m", "Org/Tiny")
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and message in res.stderr, res.stderr


def test_no_network_fails_in_one_look_up_not_23_s_of_retries(tmp_path, monkeypatch):
    # huggingface_hub 1.x retries a DNS failure 5 times (1 + 2 + 4 + 8 + 8 s); '.invalid' never resolves
    # (RFC 6761), so the answer must come from the one look-up, before any download is tried.
    import time

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("tried to download"))
    start = time.monotonic()
    res = run("params", "-m", "Org/Tiny")
    assert time.monotonic() - start < 6.0  # the look-up's own bound is 5 s
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "cannot reach the Hugging Face Hub for Org/Tiny" in res.stderr and "hub.example.invalid" in res.stderr


def test_online_downloads_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def download(repo_id, filename, cache_dir=None, **kwargs):  # what the real one leaves behind
        calls.append((repo_id, filename, cache_dir))
        return str(cache_with(tmp_path, repo_id, TINY))

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    monkeypatch.setattr(hub, "_unresolved", lambda endpoint: None)
    assert hub.resolve_model("Org/Tiny").name == "Org/Tiny"
    assert calls == [("Org/Tiny", "config.json", str(tmp_path))]
    assert hub.resolve_model("Org/Tiny").name == "Org/Tiny" and len(calls) == 1  # cached now


def test_names_that_are_not_hub_ids(tmp_path, monkeypatch):
    for name in ("a/b/c", "a--b/c", "/abs", "org/", "llama3-8b"):
        assert not hub.is_hub_id(name) or name == "llama3-8b"
    res = run("params", "-m", "llama3-8b")
    assert res.exit_code == 2 and "Did you mean llama-3-8b" in res.stderr and "Hub id (ORG/NAME)" in res.stderr
    # a local folder comes before the Hub, as in transformers' from_pretrained
    (tmp_path / "Org" / "Tiny").mkdir(parents=True)
    (tmp_path / "Org" / "Tiny" / "config.json").write_text(json.dumps(TINY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("went online"))
    assert hub.resolve_model("Org/Tiny").name == "Tiny"


def test_report_of_a_hub_model(offline_cache, tmp_path):
    cache_with(offline_cache, "Org/Tiny", TINY)
    res = run("report", "-m", "Org/Tiny", "-m", "gpt2", "--method", "lora", "--out-dir", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out" / "Org-Tiny_gpt2" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["Org/Tiny", "gpt2"]


def test_a_hub_id_estimate_never_imports_torch(tmp_path):
    cache_with(tmp_path, "Org/Tiny", TINY)
    code = ("import sys; from lorabench.cli import cli\n"
            "cli.main(['memory', '-m', 'Org/Tiny', '--gpu', 'H100-80GB'], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
