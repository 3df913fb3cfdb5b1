"""The Hugging Face hub: the token (never shown), downloads of only the files we need, and the one place
a heads argument becomes a folder (`resolve_heads`).

Every hub call goes through `_list_files` and `_download`; with `$NBKIT_HUB_MIRROR` set (or `mirror=`)
they read `<mirror>/<owner>/<name>/` folders instead, so tests and offline machines run the same code.
Downloads land in `<cache>/hub/<owner>--<name>/`: huggingface_hub skips files that are complete there and
resumes interrupted ones, so re-running a notebook reuses what it already fetched.

Below the engine (which fetches what `--model` and `--heads` name) and the notebook helpers (which call
`login` and `download_*` directly): it imports only nbkit.models and nbkit.colab.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .colab import colab_secret, in_colab
from .models import cache_dir, embedded_heads_dir, is_embedded

# A transformers model: config, tokenizer, weights (safetensors when the repo has them, else .bin).
MODEL_CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                      "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"]
SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
# Medusa heads: FasterDecoding publishes medusa_lm_head.pt; our own trained heads are safetensors.
HEADS_FILES = ["config.json", "medusa_lm_head.pt", "medusa_lm_head.safetensors", "proposal_vocab.json"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- the token ---------------------------------------------------------------------------------------
@dataclass
class Login:
    """Where the token came from. Holds no token, so a cell that shows it shows nothing secret."""

    logged_in: bool
    source: str

    def __repr__(self) -> str:
        if self.logged_in:
            return f"Hugging Face: token found ({self.source}); it is not shown."
        return ("Hugging Face: no token, going on: public models download without one. If a repository is gated "
                "or private, the download asks for a token then (or add a Colab secret HF_TOKEN: key icon on the "
                "left, or set $HF_TOKEN).")


def token_source() -> str | None:
    """Where huggingface_hub would find a token (it checks the env, the token file, then the Colab secret)."""
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "environment variable HF_TOKEN"
    if get_token() is None:
        return None
    from huggingface_hub import constants

    if Path(constants.HF_TOKEN_PATH).is_file():
        return "saved login"
    return "Colab secret HF_TOKEN" if in_colab() else "huggingface_hub"


_may_ask = True  # login(interactive=False) turns the later notebook_login() prompt off


def login(interactive: bool = True) -> Login:
    """Find a token (Colab secret HF_TOKEN, $HF_TOKEN, a saved login); without one, go on: it never blocks.

    Public models (vicuna-7b) need no token. Only when the hub answers 401 or "gated" for a repository being
    downloaded does `prepare` ask, with notebook_login() (see `_as_user`), if `interactive`. The token is
    never printed."""
    global _may_ask
    _may_ask = interactive
    source = token_source()
    if source is None and (value := colab_secret("HF_TOKEN")):
        # huggingface_hub reads Colab secrets only under Colab's own shell class; hand it the secret in-process.
        os.environ["HF_TOKEN"] = value
        source = "Colab secret HF_TOKEN"
    return Login(source is not None, source or "none")


def _needs_login(err: Exception) -> str | None:
    """'gated' or '401' when the hub refused a download for want of a (better) token, else None."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    if isinstance(err, GatedRepoError):
        return "gated"
    status = getattr(getattr(err, "response", None), "status_code", None) if isinstance(err, HfHubHTTPError) else None
    return "401" if status == 401 else None


def _as_user(repo_id: str, call):
    """Run a hub call; on 401/gated, in Colab, ask for a token once (notebook_login) and try again."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 -- only 401/gated are handled; everything else is raised as it is
        why = _needs_login(err)
        if why is None:
            raise
        message = (f"The Hugging Face hub answered {why} for {repo_id}: it needs a token of an account that "
                   "has access (accept the model's terms on its page if it is gated).")
        if not (in_colab() and _may_ask):
            raise PermissionError(f"{message} Set $HF_TOKEN or run `hf auth login`, then run again.") from err
        from huggingface_hub import notebook_login

        print(f"{message} Log in below; the token is not shown or saved in this notebook.", flush=True)
        notebook_login(skip_if_logged_in=False)
        return call()


# --- the two hub calls -------------------------------------------------------------------------------
def _mirror(mirror: str | os.PathLike | None) -> Path | None:
    mirror = mirror or os.environ.get("NBKIT_HUB_MIRROR")
    return Path(mirror) if mirror else None


def _list_files(repo_id: str, revision: str | None, mirror: Path | None) -> list[str]:
    if mirror is not None:
        root = mirror / repo_id
        if not root.is_dir():
            raise FileNotFoundError(f"{repo_id} is not in the hub mirror {mirror}")
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    from huggingface_hub import list_repo_files

    return list_repo_files(repo_id, revision=revision)


def _download(repo_id: str, files: list[str], local_dir: Path, revision: str | None, mirror: Path | None) -> Path:
    if mirror is not None:
        for name in files:
            out = local_dir / name
            if not out.is_file() or out.stat().st_size != (mirror / repo_id / name).stat().st_size:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".incomplete")
                shutil.copyfile(mirror / repo_id / name, tmp)
                tmp.replace(out)
        return local_dir
    from huggingface_hub import snapshot_download

    # allow_patterns = the exact names: only those are fetched; complete ones are skipped, partial ones resumed.
    return Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, allow_patterns=files))


# --- what the notebooks call -------------------------------------------------------------------------
def local_dir_for(repo_id: str) -> Path:
    return cache_dir() / "hub" / repo_id.replace("/", "--")


def select_files(available: list[str], patterns: list[str]) -> list[str]:
    return [f for f in available if any(fnmatch.fnmatch(f, p) for p in patterns)]


def model_files(available: list[str]) -> list[str]:
    """Config, tokenizer and ONE copy of the weights: safetensors if present, else the .bin shards."""
    weights = select_files(available, SAFETENSORS_FILES) or select_files(available, BIN_FILES)
    if not weights:
        raise FileNotFoundError("the repository holds no *.safetensors or pytorch_model*.bin weights")
    return select_files(available, MODEL_CONFIG_FILES) + weights


def is_hub_id(name) -> bool:
    """'owner/name' that is not a local path nor a .gguf file: something to fetch from the hub."""
    return (isinstance(name, str) and bool(HUB_ID.match(name)) and not name.endswith(".gguf")
            and not Path(name).exists())


def fetch_model(model):
    """A hub id -> its folder in nbkit's cache (only the files needed, fetched once, through $NBKIT_HUB_MIRROR
    when set): `python -m nbkit serve --model lmsys/vicuna-7b-v1.3` loads what the notebooks load.
    Anything else (None, a folder, a .gguf file) is returned unchanged."""
    return str(download_model(model)) if is_hub_id(model) else model


def fetch_heads(heads):
    """A hub id of Medusa heads -> its folder in the cache; anything else unchanged."""
    return str(download_heads(heads)) if is_hub_id(heads) else heads


def download_config(repo_id: str, revision: str | None = None, mirror: str | os.PathLike | None = None) -> Path:
    """Only config.json of a model repo (kilobytes): enough to plan before downloading gigabytes."""
    m = _mirror(mirror)
    return _download(repo_id, ["config.json"], local_dir_for(repo_id), revision, m)


def download_model(repo_id: str, revision: str | None = None, mirror: str | os.PathLike | None = None) -> Path:
    """A transformers model folder for `repo_id`. A local folder is returned as it is (nothing to fetch)."""
    if Path(repo_id).is_dir():
        return Path(repo_id)
    m = _mirror(mirror)
    files = _as_user(repo_id, lambda: model_files(_list_files(repo_id, revision, m)))
    return _as_user(repo_id, lambda: _download(repo_id, files, local_dir_for(repo_id), revision, m))


def download_heads(repo_id: str, revision: str | None = None, mirror: str | os.PathLike | None = None) -> Path:
    """The Medusa heads folder for `repo_id` (medusa_lm_head.pt or .safetensors, and its config.json)."""
    if Path(repo_id).exists():
        return Path(repo_id)
    m = _mirror(mirror)
    files = select_files(_as_user(repo_id, lambda: _list_files(repo_id, revision, m)), HEADS_FILES)
    if not any(f.startswith("medusa_lm_head") for f in files):
        raise FileNotFoundError(f"{repo_id} holds no medusa_lm_head.pt or medusa_lm_head.safetensors")
    return _as_user(repo_id, lambda: _download(repo_id, files, local_dir_for(repo_id), revision, m))


# --- the one heads resolver --------------------------------------------------------------------------
def resolve_heads(heads: str | os.PathLike | None, model: str | os.PathLike | None = None) -> Path | None:
    """A heads argument (--heads, load_engine, export) -> the heads' folder or file, or None for no heads.

    None (or ''): the shipped SmolLM2 heads with the embedded model, else none; 'none': none; 'embedded' (or another
    alias of the embedded model: 'default'): the shipped heads; a hub id: fetched once into the cache;
    anything else: that path."""
    if heads is None or str(heads) == "":
        return embedded_heads_dir() if is_embedded(model) and embedded_heads_dir().exists() else None
    if str(heads) == "none":
        return None
    if is_embedded(heads):
        return embedded_heads_dir()
    return Path(fetch_heads(str(heads)) if isinstance(heads, str) else heads)
