"""Every STYLETAG_* name the docs mention is a real setting, and every setting is in the README's table:
setting a documented name must never silently do nothing (STYLETAG_MODEL_PATH once did)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from catalog.settings import DEPLOYMENT_VARIABLES, ENV, Settings

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"STYLETAG_[A-Z0-9_]*[A-Z0-9]")
DOCS = [ROOT / "README.md", ROOT / ".env.example", ROOT / "docker-compose.yml", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_documented_name_is_a_setting():
    known = set(ENV.values()) | set(DEPLOYMENT_VARIABLES)
    unknown = sorted({(p.name, m) for p in DOCS for m in NAME.findall(p.read_text())} - {(p.name, k) for p in DOCS
                                                                                        for k in known})
    assert unknown == [], f"documented but not a setting: {unknown}"


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## The CLI")]
    missing = sorted(v for v in ENV.values() if f"`{v}`" not in table)
    assert missing == [], f"settings missing from the README's configuration table: {missing}"
    assert set(ENV) == {f for f in Settings.__dataclass_fields__}


def test_the_environment_is_read_in_the_settings_module_only():
    out = subprocess.run(["grep", "-rn", "--include=*.py", "os.environ\\|os.getenv", "catalog", "model", "worker"],
                         cwd=ROOT, capture_output=True, text=True).stdout
    readers = sorted({line.split(":", 1)[0] for line in out.splitlines()})
    assert readers == ["catalog/settings.py"], readers


def test_a_documented_setting_changes_the_settings(monkeypatch):
    monkeypatch.setenv("STYLETAG_MODEL", "/models/other.safetensors")
    monkeypatch.setenv("STYLETAG_TORCH_THREADS", "3")
    s = Settings.from_env()
    assert (s.model_path, s.torch_threads) == ("/models/other.safetensors", 3)
