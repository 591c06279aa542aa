"""Step 1: get the corpus from Debian packages and split it deterministically.

Sources (openly licensed reStructuredText sources of two documentation sets,
exactly as shipped in Debian 12 "bookworm" packages; fetched with
``apt-get download`` at pinned versions and unpacked with ``dpkg -x``):

* ``python3.11-doc`` 3.11.2-6+deb12u9: the Python 3.11 documentation,
  ``html/_sources/**/*.rst.txt`` (PSF licence);
* ``linux-doc-6.1`` 6.1.192-3: the Linux kernel documentation,
  ``html/_sources/**/*.rst.txt`` without ``translations/`` (GPL-2.0, a few
  files dual-licensed).

A document is one source file; the text is kept as reStructuredText, with line
ends normalised, trailing spaces stripped and runs of blank lines cut to two.
Documents are assigned by a hash of their path (``sha256(path) % 1000``):

* held-out (evaluation, never trained on): Python-doc files with hash < 140
  (about 14 % of the Python docs, >= 300k tokens); written to
  ``data/heldout.txt.xz`` so that only permissively licensed text ships;
* validation (early-stopping signal, not trained on): any file with hash in
  [140, 160);
* training: everything else; ``data/calibration.txt`` (for imatrix runs) is
  a ~300 kB slice of the Python-doc training documents.

Documents are joined with ``<|endoftext|>``.  Usage:
python scripts/reference_model/prepare_corpus.py
"""

from __future__ import annotations

import hashlib
import lzma
import re
import subprocess
from pathlib import Path

from common import CALIBRATION_TXT, DATA, DOC_SEPARATOR, HELDOUT_TXT, HELDOUT_XZ, TRAIN_TXT, VALID_TXT, WORK

PACKAGES = {
    # name: (version, path of the rst sources inside the package)
    "python3.11-doc": ("3.11.2-6+deb12u9", "usr/share/doc/python3.11/html/_sources"),
    "linux-doc-6.1": ("6.1.192-3", "usr/share/doc/linux-doc-6.1/html/_sources"),
}
HELDOUT_BELOW = 140
VALID_BELOW = 160
CALIBRATION_CHARS = 300_000
MIN_DOC_CHARS = 200


def fetch(name: str, version: str) -> Path:
    """Download and unpack one Debian package; return the unpack folder."""
    debs = WORK / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    root = debs / name
    if not root.exists():
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, check=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
        subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], check=True)
    return root


def clean(text: str) -> str:
    """Normalise line ends and white space; keep the reStructuredText as it is."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def bucket(path: str) -> int:
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 1000


def main() -> None:
    train, valid, heldout, calibration = [], [], [], []
    n_cal = 0
    for name, (version, sources) in PACKAGES.items():
        base = fetch(name, version) / sources
        files = sorted(p for p in base.rglob("*.txt") if "translations" not in p.relative_to(base).parts)
        for p in files:
            rel = f"{name}/{p.relative_to(base).as_posix()}"
            doc = clean(p.read_text(encoding="utf-8", errors="replace"))
            if len(doc) < MIN_DOC_CHARS or DOC_SEPARATOR in doc:
                continue
            b = bucket(rel)
            if name == "python3.11-doc" and b < HELDOUT_BELOW:
                heldout.append(doc)
            elif HELDOUT_BELOW <= b < VALID_BELOW:
                valid.append(doc)
            else:
                train.append(doc)
                if name == "python3.11-doc" and b % 10 == 0 and n_cal < CALIBRATION_CHARS:
                    calibration.append(doc)
                    n_cal += len(doc)
    WORK.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    sep = f"\n{DOC_SEPARATOR}\n"
    TRAIN_TXT.write_text(sep.join(train), encoding="utf-8")
    VALID_TXT.write_text(sep.join(valid), encoding="utf-8")
    held = sep.join(heldout)
    HELDOUT_TXT.write_text(held, encoding="utf-8")
    # xz with fixed settings and no timestamp: the same bytes on every run.
    HELDOUT_XZ.write_bytes(lzma.compress(held.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    CALIBRATION_TXT.write_text(sep.join(calibration), encoding="utf-8")
    for label, docs in (
        ("train", train),
        ("valid", valid),
        ("heldout", heldout),
        ("calibration", calibration),
    ):
        print(f"{label:12s} {len(docs):5d} docs {sum(map(len, docs)):10d} chars")


if __name__ == "__main__":
    main()
