"""The README's state diagram is the one the code exports."""

from __future__ import annotations

import re
from pathlib import Path

from jobflow import states

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_shows_the_exported_diagram() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no mermaid block"
    assert blocks[0] == states.mermaid()


def test_diagram_has_every_transition_of_the_table() -> None:
    diagram = states.mermaid()
    for (event, source), edges in states.TABLE.items():
        for edge in edges:
            assert f"{source} --> {edge.dest}: {event}" in diagram
