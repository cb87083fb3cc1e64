"""Regenerate the option tables of docs/configuration.md from the configuration classes.

    python tools/config_docs.py          # rewrite the tables in place
    python tools/config_docs.py --check  # exit 1 if they are stale (tests/test_config.py)

Each table sits between ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->``; the prose
around them is written by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from shardlm.engine_config import GROUP_TITLES, EngineConfig
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.options import markdown_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def tables() -> dict[str, str]:
    return {
        "engine": markdown_table(EngineConfig, GROUP_TITLES),
        "server": markdown_table(ServerConfig),
    }


def render(text: str) -> str:
    for name, table in tables().items():
        pattern = re.compile(rf"(<!-- options:{name} -->\n).*?(<!-- /options:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: no <!-- options:{name} --> section")
        text = pattern.sub(lambda m, t=table: m.group(1) + "\n" + t + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    fresh = render(text)
    if "--check" in argv:
        return 0 if fresh == text else 1
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
