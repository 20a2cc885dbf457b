"""The documents a user reads must say what the code does."""

from __future__ import annotations

from pathlib import Path

from asyncpolicy.cli import config_reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current() -> None:
    """docs/config.md lists every key with today's default; regenerate with `python -m asyncpolicy config --markdown`."""
    assert (ROOT / "docs" / "config.md").read_text() == config_reference_markdown()


def test_readme_opens_with_the_two_setup_commands() -> None:
    """The README's first commands: one runs the main job, one runs the tests (the same line as .ci/run)."""
    readme = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(readme) == 2
    assert readme[0].endswith("python -m asyncpolicy run")
    assert readme[1] in (ROOT / ".ci" / "run").read_text()
