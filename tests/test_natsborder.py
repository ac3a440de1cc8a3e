"""nats-py's private API, as `app.natsborder` uses it: present in the installed version.

Fails loudly, naming what is gone, when nats-py changes under the pin
(``nats-py>=2.16,<2.17`` in pyproject.toml): adapt app/natsborder.py, then widen it.
"""

from __future__ import annotations

from importlib.metadata import version

from app import natsborder


def test_the_installed_nats_py_has_every_private_name_the_border_uses() -> None:
    missing = natsborder.missing_private_api()
    assert not missing, (
        f"nats-py {version('nats-py')} lacks {', '.join(missing)}: app/natsborder.py "
        "relies on it; adapt the border before changing the pin in pyproject.toml"
    )


def test_the_border_names_nothing_it_does_not_check() -> None:
    # Every private attribute natsborder.py touches is in the checked lists.
    import inspect
    import re

    source = inspect.getsource(natsborder)
    used = set(re.findall(r"(?:nc|sub|self\._sub)\.(_[a-z][a-z_]*)", source))
    checked = set(natsborder.CLIENT_ATTRIBUTES) | set(natsborder.SUBSCRIPTION_ATTRIBUTES)
    assert used <= checked, f"unchecked: {sorted(used - checked)}"
