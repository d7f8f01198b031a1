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


def test_the_design_doc_tables_every_event_and_the_cancel_of_a_running_job() -> None:
    design = (README.parent / "docs" / "design.md").read_text()
    for event in {event for event, _ in states.TABLE}:
        assert f"| `{event}` |" in design, f"docs/design.md has no row for {event}"
    diagram = states.mermaid()
    assert "quick_running --> quick_running: request_cancel" in diagram
    assert "quick_running --> failed: release" in diagram
    assert "done --> " not in diagram.replace("done --> [*]", ""), "done is terminal"
