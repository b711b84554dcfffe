"""docs/design.md lists every module of the package (its layout is the map a reader starts from)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "transfer"


def test_design_doc_names_every_module():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    missing = [str(f.relative_to(SRC)) for f in sorted(SRC.rglob("*.py"))
               if f.name != "__init__.py" and not re.search(rf"(?<![\w.]){re.escape(f.name)}\b", text)]
    assert not missing, "modules docs/design.md does not list (add them to its package layout): " + ", ".join(missing)
