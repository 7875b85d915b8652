"""What `normbench list` shows: each config option with its description, read from the YAML files alone
(no Hydra, no torch), so the command starts in a fraction of a second; and the plugins' entries."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def description(text: str, preset: bool) -> str:
    """A YAML's description: its first comment paragraph, whole; for a preset also its run count and
    its `# Time:` line (measured on a 2-core CPU)."""
    comments = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#") and "@package" not in ln]
    paragraph = []
    for line in comments:
        if not line:
            if paragraph:
                break
            continue
        paragraph.append(line)
    words = " ".join(paragraph)
    if preset:
        runs = _preset_runs(text)
        time = _time_line(comments)
        words += f" [{runs} run{'s' if runs != 1 else ''}" if runs else " ["
        words += (f"; {time}]" if time else "]") if runs or time else ""
        words = words.replace(" []", "")
    return words


def _time_line(comments: list[str]) -> str | None:
    """A preset's `# Time:` sentence, with its continuation lines (up to a blank line or the command)."""
    for i, line in enumerate(comments):
        if line.lower().startswith("time:"):
            words = [line.split(":", 1)[1].strip()]
            for more in comments[i + 1:]:
                if not more or more.startswith(("normbench ", "-")):
                    break
                words.append(more)
            return " ".join(words)
    return None


def _preset_runs(text: str) -> int | None:
    """The number of runs a preset's sweep grid makes (hydra.sweeper.params crossed with the union of
    hydra.sweeper.grids), from its YAML alone; None where a value is not a plain list or range."""
    import yaml

    try:
        sweeper = ((yaml.safe_load(text) or {}).get("hydra") or {}).get("sweeper") or {}
        size = _grid_size(sweeper.get("params") or {})
        grids = sweeper.get("grids")
        return size * sum(_grid_size(g) for g in grids) if grids else size
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def _grid_size(grid: dict) -> int:
    size = 1
    for value in grid.values():
        text = str(value).strip()
        if text.startswith("range(") and text.endswith(")"):
            size *= len(range(*(int(a) for a in text[6:-1].split(","))))
        elif not any(c in text for c in "()[]{}*$"):
            size *= len(text.split(","))
        else:
            raise ValueError(text)
    return size


def choices(group: str, config_dir: Path | None) -> dict[str, tuple[str, bool]]:
    """Option name -> (its description, whether it comes from the user's config folder), packaged first;
    a user's YAML of the same name is the one Hydra uses."""
    folders = [(resources.files("normbench.conf") / group, False)]
    if config_dir:
        folders.append((Path(config_dir) / group, True))
    found = {}
    for folder, yours in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".yaml") and entry.is_file():  # (a folder named x.yaml is no choice)
                try:
                    text = entry.read_text()
                except (OSError, UnicodeDecodeError) as e:
                    text = f"# (cannot read it: {e})"
                refused = _refusal(Path(config_dir), Path(entry)) if yours else None
                found[entry.name[:-5]] = (refused or description(text, group == "experiment"), yours)
    from normbench.plugins import ENTRIES

    for (kind, name), e in sorted(ENTRIES.items()):
        if kind == group and name not in found:  # a plugin's entry: its defaults need no YAML
            keys = [k for k in e.schema.__dataclass_fields__ if k != "name"]
            found[name] = (f"{e.description} (plugin {e.provenance.plugin}; keys: {', '.join(keys)})".strip(), False)
    return found


def _refusal(root: Path, path: Path) -> str | None:
    """Why every command refuses the user's config folder because of this file, or None."""
    from normbench.config.safety import check_config_file  # (Hydra's parser: only with a config folder)
    from normbench.errors import UserError

    try:
        check_config_file(root, path)
    except UserError as e:
        return f"UNUSABLE, and every command with this --config-dir refuses it: {e}"
    return None


def groups() -> list[str]:
    """The packaged config groups users choose from (one folder of YAMLs each; hydra/ is Hydra's own),
    presets last. Read from the folders, so listing needs no config package (and no Hydra)."""
    folders = sorted(e.name for e in resources.files("normbench.conf").iterdir()
                     if e.is_dir() and e.name not in ("hydra", "experiment") and not e.name.startswith("_"))
    return [*folders, "experiment"]
