"""One way to configure: every STUDIO_* variable is read in studio/settings.py, and the code
reads django.conf.settings, never the environment, for them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDIO_VAR = re.compile(r"\bSTUDIO_[A-Z_]+\b")
# Read outside settings.py on purpose: the launcher's one-time admin password, the test
# suite's own database name for the workers it starts, and where test data goes.
ELSEWHERE = {"STUDIO_ADMIN_PASSWORD", "STUDIO_TEST_DB_NAME"}


def _readme_vars() -> set[str]:
    return set(STUDIO_VAR.findall((ROOT / "README.md").read_text(encoding="utf-8")))


def test_every_readme_variable_is_a_setting():
    from django.conf import settings

    source = (ROOT / "studio" / "settings.py").read_text(encoding="utf-8")
    for name in sorted(_readme_vars() - ELSEWHERE):
        assert f'"{name}"' in source, f"{name} is in the README but settings.py never reads it"
        if name not in ("STUDIO_DATA_DIR", "STUDIO_MEDIA_ROOT", "STUDIO_LOG_LEVEL", "STUDIO_HTTPS"):
            assert hasattr(settings, name), f"{name} is read but not a setting"


def test_every_setting_variable_is_in_the_readme():
    source = (ROOT / "studio" / "settings.py").read_text(encoding="utf-8")
    read = set(re.findall(r'"(STUDIO_[A-Z_]+)"', source)) - ELSEWHERE
    assert read <= _readme_vars(), f"not in the README: {sorted(read - _readme_vars())}"


def test_no_code_reads_studio_variables_from_the_environment():
    # A read, not the launcher handing a value on to its children (os.environ[...] = ...).
    environ_read = re.compile(
        r"(os\.environ\.get\(|os\.getenv\(|os\.environ\[)\s*[\"'](STUDIO_[A-Z_]+)[\"'](?!\]\s*=[^=])"
    )
    offenders = []
    for folder in ("studio", "synthesis", "training"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("settings.py", "test_settings.py"):
                continue
            for match in environ_read.finditer(path.read_text(encoding="utf-8")):
                if match.group(2) not in ELSEWHERE:
                    offenders.append(f"{path.relative_to(ROOT)}: {match.group(2)}")
    assert offenders == []
