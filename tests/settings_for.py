"""Settings for tests, through the parser the stage scripts use: an args module (or a dict of its constants) with
overrides given as values, each passed as a key=value item of the command line."""
from __future__ import annotations

import types
from typing import Any

from training.settings import Settings, load_settings


def settings_for(args: types.ModuleType | dict[str, Any], overrides: dict[str, Any] | None = None) -> Settings:
    if isinstance(args, dict):
        module = types.ModuleType("test_args")
        vars(module).update(args)
        args = module
    return load_settings(args, [f"{name}={value!r}" for name, value in (overrides or {}).items()])
