"""Vendor the Live Chat page's chart library from the npm registry, pinned and checked.

The page must work offline, so the library ships inside the package. This script is the only
thing that touches the network: it asks the registry for one exact version, downloads that
version's tarball, refuses it unless its sha512 matches the registry's ``dist.integrity``, and
copies only the files the page loads (plus the licence) into ``server/static/vendor/``.
``VENDORED.json`` records what was taken and from where, with a sha256 per file so the copy can
be checked later without the network (``--check``).

    python scripts/fetch_frontend.py            # fetch and write the vendored files
    python scripts/fetch_frontend.py --check    # offline: do the files match VENDORED.json?
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
PACKAGE = "uplot"
VERSION = "1.6.32"
# tarball member -> file name under vendor/ (the page loads the first two; the third is the law)
FILES = {
    "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "package/dist/uPlot.min.css": "uPlot.min.css",
    "package/LICENSE": "uPlot.LICENSE.txt",
}
VENDOR = Path(__file__).resolve().parents[1] / "src/residlab/server/static/vendor"
RECORD = "VENDORED.json"


def _get(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def check_integrity(data: bytes, integrity: str) -> None:
    """Raise unless ``data`` has the Subresource-Integrity sha512 the registry published."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise ValueError(f"unsupported integrity {algorithm!r}: expected a sha512-... value")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise ValueError(f"tarball sha512 mismatch: registry says {expected}, got {actual}")


def extract(tarball: bytes, members: dict[str, str], dest: Path) -> dict[str, str]:
    """Copy the named regular files out of the tarball (nothing else); sha256 of each copy.
    Every member is checked before anything is written."""
    contents = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member_name, file_name in members.items():
            member = archive.getmember(member_name)  # KeyError names a missing file
            if not member.isfile():
                raise ValueError(f"{member_name} in the tarball is not a regular file")
            contents[file_name] = archive.extractfile(member).read()
    dest.mkdir(parents=True, exist_ok=True)
    for file_name, data in contents.items():
        (dest / file_name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def fetch(package: str = PACKAGE, version: str = VERSION, dest: Path = VENDOR) -> dict:
    """Download, verify and vendor one exact version; returns the record it writes."""
    meta = json.loads(_get(f"{REGISTRY}/{package}/{version}"))
    if meta.get("version") != version:
        raise ValueError(f"registry answered version {meta.get('version')!r}, not {version}")
    tarball_url, integrity = meta["dist"]["tarball"], meta["dist"]["integrity"]
    tarball = _get(tarball_url)
    check_integrity(tarball, integrity)
    files = extract(tarball, FILES, dest)
    record = {"name": package, "version": version, "license": meta.get("license"),
              "license_file": FILES["package/LICENSE"], "homepage": meta.get("homepage"),
              "tarball": tarball_url, "integrity": integrity, "files": files}
    (dest / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def check(dest: Path = VENDOR) -> list[str]:
    """Problems with the vendored copy (empty when every file matches VENDORED.json)."""
    record = json.loads((dest / RECORD).read_text())
    problems = []
    for name, digest in record["files"].items():
        path = dest / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: sha256 differs from {RECORD}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the vendored files against VENDORED.json (no network)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    record = fetch()
    print(f"vendored {record['name']} {record['version']} ({record['license']}) into {VENDOR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
