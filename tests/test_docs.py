"""The README documents every setting and the commands CI relies on."""

from __future__ import annotations

import re

from analysis.settings import REPO_ROOT, SETTINGS, Settings

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def settings_table_rows() -> dict[str, tuple[str, str]]:
    """`| MEMLENS_X | default | meaning |` rows of the README, by variable name."""
    rows = {}
    for line in README.splitlines():
        match = re.match(r"\|\s*`(MEMLENS_[A-Z_]+)`\s*\|\s*`?([^|`]*)`?\s*\|\s*([^|]+)\|", line)
        if match:
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())
    return rows


def test_every_setting_is_in_the_readme_table():
    rows = settings_table_rows()
    missing = [s.env for s in SETTINGS if s.env not in rows]
    assert not missing, f"add these settings to the README's settings table: {missing}"


def test_readme_table_lists_no_unknown_setting():
    known = {s.env for s in SETTINGS}
    assert set(settings_table_rows()) <= known


def test_readme_defaults_match_the_code():
    rows = settings_table_rows()
    for setting in SETTINGS:
        if setting.env == "MEMLENS_CACHE_DIR":
            assert rows[setting.env][0] == ".memlens-cache"
        else:
            assert rows[setting.env][0] == setting.default, setting.env


def test_defaults_parse():
    settings = Settings.from_env({})
    assert settings.host == "127.0.0.1" and settings.port == 8050 and settings.debug is False


def test_invalid_setting_names_the_variable():
    import pytest

    with pytest.raises(ValueError, match="MEMLENS_PORT='http'"):
        Settings.from_env({"MEMLENS_PORT": "http"})


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in README and "make test" in ci
    assert "make run" in README
