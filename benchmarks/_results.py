"""Where the benchmark scripts write their JSON: ``$OUT`` (the folder the device tool brings
back) or ``./out``."""

from __future__ import annotations

import json
import os


def write_json(name: str, data) -> str:
    """Write ``data`` to ``<$OUT or ./out>/<name>`` (indented) and return the path."""
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path
