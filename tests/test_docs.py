"""The README's reference sections are generated from the code and must not drift."""

from __future__ import annotations

from conftest import REPO
from enclaver_rules.cli import docs
from enclaver_rules.manifest import settings


def test_readme_generated_sections_are_current() -> None:
    assert docs.main(["--check", str(REPO / "README.md")]) == 0, \
        "run: python -m enclaver_rules.cli.docs README.md"


def test_readme_opens_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    first_blocks = text.split("```sh")[1:3]
    assert ".venv/bin/doit" in first_blocks[0] and "bash .ci/run" in first_blocks[1]


def test_every_field_and_variable_is_documented() -> None:
    text = (REPO / "README.md").read_text()
    for s in settings():
        assert f"`{s.key}`" in text
        if s.overridable:
            assert f"`{s.env}`" in text and f"`{s.flag}`" in text


def test_check_detects_staleness(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stale = tmp_path / "README.md"
    stale.write_text("x\n<!-- BEGIN GENERATED: exit-codes -->\nold\n<!-- END GENERATED: exit-codes -->\n"
                     "<!-- BEGIN GENERATED: commands -->\n<!-- END GENERATED: commands -->\n"
                     "<!-- BEGIN GENERATED: manifest-fields -->\n<!-- END GENERATED: manifest-fields -->\n")
    assert docs.main(["--check", str(stale)]) == 1
    assert docs.main([str(stale)]) == 0
    assert docs.main(["--check", str(stale)]) == 0
