"""The files under ``deploy/slurm/`` (sbatch scripts, slurm.conf) and how they are filled in.

Placeholders are ``@NAME@`` (upper-case letters, digits, ``_``): they cannot be confused with the
shell's ``$VAR``/``${VAR}`` inside a batch script. Rendering is strict both ways: a placeholder
without a value and a value without a placeholder are both errors, so a template and the code that
fills it cannot drift apart silently. A value may not span lines (it could smuggle in a directive
or a command) unless the caller names it as one made of whole lines it built itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agentmesh.errors import ConfigError

__all__ = ["PLACEHOLDER_RE", "render", "render_file", "templates_dir"]

PLACEHOLDER_RE = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def templates_dir() -> Path:
    """``$AGENTMESH_SLURM_TEMPLATES``, else ``deploy/slurm`` of the source tree this package sits in."""
    override = os.environ.get("AGENTMESH_SLURM_TEMPLATES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "deploy" / "slurm"


def render(
    text: str, values: dict[str, str], *, source: str = "template", multiline: frozenset[str] = frozenset()
) -> str:
    """``text`` with every ``@NAME@`` replaced by ``values[NAME]``; ConfigError on a mismatch.

    Only the values named in ``multiline`` may hold line breaks."""
    wanted = set(PLACEHOLDER_RE.findall(text))
    missing = sorted(wanted - set(values))
    if missing:
        raise ConfigError(f"{source}: no value for placeholder(s) {', '.join(missing)}", key="template")
    unused = sorted(set(values) - wanted)
    if unused:
        raise ConfigError(f"{source}: no placeholder for value(s) {', '.join(unused)}", key="template")
    for key, value in values.items():
        if "\n" in value and key not in multiline:
            raise ConfigError(f"{source}: the value of {key} spans lines: {value!r}", key="template")
    return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def render_file(
    name: str,
    values: dict[str, str],
    *,
    directory: Path | None = None,
    multiline: frozenset[str] = frozenset(),
) -> str:
    """Render the template ``name`` of :func:`templates_dir` (or ``directory``)."""
    path = (directory or templates_dir()) / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"template {path} not found (set AGENTMESH_SLURM_TEMPLATES to the deploy/slurm folder)",
            key="template",
        ) from None
    return render(text, values, source=str(path), multiline=multiline)
