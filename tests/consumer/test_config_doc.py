"""The docs' configuration table is exactly what the settings models generate."""

from pathlib import Path

from consumer import config_doc

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_docs_table_matches_the_settings() -> None:
    text = PAGE.read_text()
    start, end = text.index(config_doc.BEGIN), text.index(config_doc.END) + len(config_doc.END)
    assert text[start:end] == config_doc.render(), "run: python -m consumer.config_doc"


def test_every_setting_is_documented() -> None:
    undocumented = [line for line in config_doc.render().splitlines() if line.endswith("|  |")]
    assert undocumented == []
