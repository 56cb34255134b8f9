"""Real text for the training tests: CPython's standard library, cut into short documents."""

import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_short_documents(root: Path, n_train: int = 50, n_held: int = 10) -> tuple[str, str]:
    """textwrap.py cut into documents of 60..300 bytes, ``n_train`` in ``root/train`` and ``n_held``
    in ``root/held`` (one file each): most training rows of 32 tokens cross a document boundary."""
    text = (STDLIB / "textwrap.py").read_text()
    pos = 0
    for i in range(n_train + n_held):
        n = 60 + (i * 37) % 240
        folder = root / ("train" if i < n_train else "held")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc{i:02d}.txt").write_text(text[pos:pos + n])
        pos += n
    return str(root / "train"), str(root / "held")
