"""Read the Debian mirror from this machine's apt configuration, so no mirror host name is hard-coded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .config import HarnessError


@dataclass(frozen=True)
class AptSource:
    """One `deb` line or deb822 stanza: a repository URI with its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def _parse_one_line(text: str) -> list[AptSource]:
    sources = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue  # deb-src, blank or comment
        options: dict[str, str] = {}
        match = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        if match:
            for item in match.group(1).split():
                key, _, value = item.partition("=")
                options[key] = value
            rest = match.group(2).split()
        else:
            rest = line.split()[1:]
        if len(rest) < 2:
            continue
        sources.append(AptSource(rest[0], (rest[1],), tuple(rest[2:]), options.get("signed-by")))
    return sources


def _parse_deb822(text: str) -> list[AptSource]:
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and current:
                fields[current] += "\n" + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if sep:
                current = key.strip().lower()
                fields[current] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by")
        if signed_by and "\n" in signed_by:
            signed_by = None  # an inline key block; the node's own debian-archive-keyring covers Debian
        for uri in fields.get("uris", "").split():
            sources.append(
                AptSource(uri, tuple(fields.get("suites", "").split()), tuple(fields.get("components", "").split()), signed_by)
            )
    return sources


def host_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """All enabled binary sources apt on this machine uses, in apt's own file order."""
    sources: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        sources += _parse_one_line(main_list.read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += _parse_one_line(path.read_text())
            elif path.suffix == ".sources":
                sources += _parse_deb822(path.read_text())
    return sources


def debian_sources_for(suite: str, sources: list[AptSource]) -> list[AptSource]:
    """The sources that serve `suite` and its -updates/-security companions (what a node's apt should use)."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security", f"{suite}/updates"}
    picked = []
    for source in sources:
        suites = tuple(s for s in source.suites if s in wanted)
        if suites:
            picked.append(AptSource(source.uri, suites, source.components or ("main",), source.signed_by))
    return picked


def debootstrap_mirror(suite: str, sources: list[AptSource]) -> AptSource:
    """The first source that carries `suite` itself with `main`: debootstrap's mirror."""
    for source in sources:
        if suite in source.suites and "main" in source.components:
            return source
    raise HarnessError(
        f"no apt source for suite {suite!r} with component main in /etc/apt/sources.list or "
        "/etc/apt/sources.list.d/ (*.list, *.sources); add one, e.g. a deb822 Debian.sources stanza"
    )


def render_deb822(sources: list[AptSource], keyring_exists) -> str:
    """deb822 text for a node; Signed-By is kept only where the node has that keyring file."""
    stanzas = []
    for source in sources:
        lines = ["Types: deb", f"URIs: {source.uri}", f"Suites: {' '.join(source.suites)}", f"Components: {' '.join(source.components)}"]
        if source.signed_by and keyring_exists(source.signed_by):
            lines.append(f"Signed-By: {source.signed_by}")
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)
