"""`./strait keys generate|rotate`: a site's CurveZMQ and Ed25519 key files,
secret files 0600, never overwritten, rotation keeps the retired files."""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))
KEYS = os.path.join(BUILD, "transport", "strait_keys")


def keys(*args):
    return subprocess.run([KEYS, *args], capture_output=True, text=True)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generate_writes_both_pairs_with_secret_files_private_and_never_overwrites(tmp_path):
    d = str(tmp_path / "keys")
    r = keys("generate", "hangzhou", "--dir", d)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(d)) == ["hangzhou.key", "hangzhou.pub", "hangzhou.sign", "hangzhou.sign.pub"]
    assert mode(os.path.join(d, "hangzhou.key")) == 0o600 and mode(os.path.join(d, "hangzhou.sign")) == 0o600
    assert mode(os.path.join(d, "hangzhou.pub")) == 0o644
    assert len(open(os.path.join(d, "hangzhou.sign.pub")).read().strip()) == 64
    before = open(os.path.join(d, "hangzhou.key")).read()
    r = keys("generate", "hangzhou", "--dir", d)
    assert r.returncode == 1 and "already exist" in r.stderr and "rotate" in r.stderr
    assert open(os.path.join(d, "hangzhou.key")).read() == before
    # A key directory from before audit keys existed gets only the missing pair.
    os.remove(os.path.join(d, "hangzhou.sign"))
    os.remove(os.path.join(d, "hangzhou.sign.pub"))
    r = keys("generate", "hangzhou", "--dir", d)
    assert r.returncode == 0 and "hangzhou.sign" in r.stdout and ".key (secret" not in r.stdout
    assert open(os.path.join(d, "hangzhou.key")).read() == before


def test_rotate_retires_the_old_files_and_writes_new_ones(tmp_path):
    d = str(tmp_path / "keys")
    assert keys("generate", "sg", "--dir", d).returncode == 0
    old = {n: open(os.path.join(d, n)).read() for n in os.listdir(d)}
    r = keys("rotate", "sg", "--dir", d)
    assert r.returncode == 0, r.stderr
    names = os.listdir(d)
    for n, text in old.items():
        retired = [x for x in names if x.startswith(n + ".retired-")]
        assert len(retired) == 1, names
        assert open(os.path.join(d, retired[0])).read() == text
        assert open(os.path.join(d, n)).read() != text  # a new key in its place
    assert mode(os.path.join(d, "sg.sign")) == 0o600
