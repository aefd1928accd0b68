"""Data residency: a dataset directory carries a manifest saying under which
jurisdiction it is held and what it contains; strait refuses to open it at a
site of another jurisdiction, or one the site's policy does not list.

    ./strait data manifest DIR --jurisdiction CN [--name NAME]
    ./strait data verify DIR

    ds = strait.data.open_dataset("datasets/hz", session)   # PolicyViolation if not ours
    for path in ds.files: ...

The manifest, DIR/STRAIT-MANIFEST.json:
    {"format": 1, "name": ..., "jurisdiction": "CN",
     "files": [{"path": "relative/path", "bytes": N, "sha256": "..."}, ...]}

This is a guard against mistakes (a job pointed at the wrong country's data, a
dataset copied somewhere it should not be), checked where the data is read.
It does not stop a program that reads files without asking strait.
"""

import argparse
import hashlib
import json
import os
import sys

MANIFEST = "STRAIT-MANIFEST.json"


class _Errors:
    """StraitError and PolicyViolation without importing torch at module load."""

    @staticmethod
    def policy(msg):
        try:
            from .session import PolicyViolation
        except ImportError:  # used standalone (no torch)
            return PermissionError(msg)
        return PolicyViolation(msg)

    @staticmethod
    def error(msg):
        try:
            from .session import StraitError
        except ImportError:
            return RuntimeError(msg)
        return StraitError(msg)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel != MANIFEST:
                out.append(rel)
    return out


def write_manifest(directory, jurisdiction, name=None):
    """Hashes every file under `directory` and writes its manifest."""
    if len(jurisdiction) != 2 or not jurisdiction.isupper() or not jurisdiction.isalpha():
        raise _Errors.error(f"strait data: jurisdiction {jurisdiction!r} must be an ISO 3166-1 alpha-2 code such "
                            "as CN or SG")
    if not os.path.isdir(directory):
        raise _Errors.error(f"strait data: '{directory}' is not a directory")
    files = [{"path": rel, "bytes": os.path.getsize(os.path.join(directory, rel)),
              "sha256": _sha256(os.path.join(directory, rel))} for rel in _files(directory)]
    manifest = {"format": 1, "name": name or os.path.basename(os.path.abspath(directory)),
                "jurisdiction": jurisdiction, "files": files}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return manifest


class Dataset:
    """An opened dataset: `name`, `jurisdiction`, `root` and `files` (absolute
    paths, in manifest order)."""

    def __init__(self, root, manifest):
        self.root = root
        self.manifest = manifest
        self.name = manifest["name"]
        self.jurisdiction = manifest["jurisdiction"]
        self.files = [os.path.join(root, f["path"]) for f in manifest["files"]]

    def __repr__(self):
        return f"Dataset({self.name!r}, {self.jurisdiction}, {len(self.files)} files at {self.root})"


def _read_manifest(root):
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise _Errors.policy(f"strait: '{root}' has no {MANIFEST}: strait opens only datasets whose jurisdiction is "
                             f"on record (./strait data manifest {root} --jurisdiction CC)")
    try:
        with open(path) as f:
            m = json.load(f)
        assert m.get("format") == 1 and isinstance(m.get("files"), list) and m.get("jurisdiction")
        return m
    except (ValueError, AssertionError, AttributeError):
        raise _Errors.error(f"strait: {path} is not a strait dataset manifest (format 1)") from None


def verify_files(root, manifest):
    """Raises StraitError naming the first file that differs from the manifest."""
    listed = {f["path"]: f for f in manifest["files"]}
    present = set(_files(root))
    extra = sorted(present - set(listed))
    if extra:
        raise _Errors.error(f"strait: dataset '{manifest['name']}': {extra[0]} is not in its manifest (added after "
                            "it was written?)")
    for rel, f in listed.items():
        full = os.path.join(root, rel)
        if rel not in present:
            raise _Errors.error(f"strait: dataset '{manifest['name']}': {rel} is listed in its manifest but missing")
        if os.path.getsize(full) != f["bytes"] or _sha256(full) != f["sha256"]:
            raise _Errors.error(f"strait: dataset '{manifest['name']}': {rel} changed since its manifest was "
                                "written (sha256 differs)")


def site_data_paths():
    """The dataset directories the launcher gave this site ($STRAIT_DATA), or None."""
    value = os.environ.get("STRAIT_DATA")
    if value is None:
        return None
    return [os.path.abspath(p) for p in value.split(os.pathsep) if p]


def open_dataset(directory, session=None, jurisdiction=None, verify=True):
    """Opens a dataset at this site. Refuses (PolicyViolation), naming both,
    a dataset held under another jurisdiction than the site's (from
    `session.jurisdiction`, or `jurisdiction`), and one outside the site's
    dataset directories when the launcher set them. With `verify`, every
    file is checked against the manifest's sha256."""
    root = os.path.abspath(directory)
    here = jurisdiction or (session.jurisdiction if session is not None else None)
    if here is None:
        raise _Errors.error("strait.data.open_dataset: pass the session (or jurisdiction=...) so the dataset's "
                            "jurisdiction can be checked")
    allowed = site_data_paths()
    if allowed is not None and not any(root == p or root.startswith(p + os.sep) for p in allowed):
        site = getattr(session, "site", None) or os.environ.get("STRAIT_SITE", "this site")
        raise _Errors.policy(f"strait: '{directory}' is not one of the datasets of site '{site}' (its policy lists: "
                             f"{', '.join(allowed) or 'none'})")
    manifest = _read_manifest(root)
    if manifest["jurisdiction"] != here:
        site = getattr(session, "site", None) or "this site"
        raise _Errors.policy(f"strait: dataset '{manifest['name']}' at {directory} is held under jurisdiction "
                             f"{manifest['jurisdiction']}; site '{site}' is in {here}: it may not be opened here")
    if verify:
        verify_files(root, manifest)
    return Dataset(root, manifest)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="strait data", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="hash a dataset directory and record its jurisdiction")
    m.add_argument("dir")
    m.add_argument("--jurisdiction", required=True)
    m.add_argument("--name")
    v = sub.add_parser("verify", help="check a dataset directory against its manifest")
    v.add_argument("dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "manifest":
            man = write_manifest(args.dir, args.jurisdiction, args.name)
            total = sum(f["bytes"] for f in man["files"])
            print(f"wrote {os.path.join(args.dir, MANIFEST)}: dataset '{man['name']}', {man['jurisdiction']}, "
                  f"{len(man['files'])} files, {total} bytes")
        else:
            man = _read_manifest(os.path.abspath(args.dir))
            verify_files(os.path.abspath(args.dir), man)
            print(f"{args.dir}: OK, dataset '{man['name']}' ({man['jurisdiction']}), {len(man['files'])} files match")
    except (RuntimeError, PermissionError) as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
