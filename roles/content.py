"""What `deploy.py --diff` shows for the files the rollout manages, where pyinfra 3.10's own operations show
nothing or the wrong thing. Each operation here is the stock one (called through its `_inner`, pyinfra's way of
composing operations) plus the diff pyinfra prints for files.put: printed while the operation works out its
commands, only when `state.config.DIFF` is set, through `host.log` and pyinfra's unified-diff formatter
(`generate_color_diff`), so it reads like pyinfra's own.

- `file_copied`: files.put for content a diff must not print. Secrets (private keys, the first admin's password
  hash, the SSO client secret) and binaries (the model, the engine, the sdist) get one line saying that their
  content differs; files.put's diff would print both the node's and the new content, and for a binary `cat` the
  node's copy over SSH and then fail to decode it. A mode or owner change still shows as files.put shows it.
- `block_in_file`: files.block, with the unified diff of the whole file (files.block prints none).
- `line_in_file`: files.line, with the unified diff of the file (files.line prints none for an appended line, and
  an empty one for our grep patterns).

Files copied with the stock files.put (systemd units, supervisor programs, sysctl and tmpfiles settings,
certificates, the staged clawbot.json) already get pyinfra's diff; clawbot.json's own is printed by
roles.agent.config_installed.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pyinfra import host, logger, state
from pyinfra.api import operation
from pyinfra.api.util import get_file_sha1
from pyinfra.facts.files import Block, File, FileContents, FindInFile, Sha1File
from pyinfra.operations import files
from pyinfra.operations.util.files import adjust_regex, generate_color_diff

SECRET = "secret, not shown"
BINARY = "binary, not shown"


def log_diff(path: str, current: list[str] | None, desired: list[str]) -> None:
    """Print a file's unified diff the way files.put does with --diff ("Will create|modify PATH", then the hunks).

    + path: the file on the node
    + current: its lines now (None: it does not exist)
    + desired: its lines after the change
    """
    host.log(f"Will {'create' if current is None else 'modify'} {path}", logger.info)
    for line in generate_color_diff(list(current or []), list(desired)):
        logger.info("  %s", line)
    logger.info("")


@contextmanager
def content_diff_off():
    """Run a stock operation's generator without its content diff (state.config.DIFF off, restored after).

    Used around a generator that is consumed at once (`list(op._inner(...))`), never across a `yield`, so no
    other operation runs while the setting is off.
    """
    diff = state.config.DIFF
    state.config.DIFF = False
    try:
        yield
    finally:
        state.config.DIFF = diff


@operation()
def file_copied(src: str, dest: str, note: str, user: str | None = None, group: str | None = None,
                mode: str | None = None):
    """Copy a file as files.put does; with --diff, say in one line that its content differs instead of printing it.

    + src: the file on the control machine
    + dest: where it goes on the node
    + note: what --diff prints instead of the content (SECRET, BINARY or a reason)
    + user: the file's owner, as files.put
    + group: the file's group, as files.put
    + mode: the file's mode, as files.put
    """
    if state.config.DIFF:
        # the facts files.put reads first, so its own checks cost no second round trip
        if not host.get_fact(File, path=dest):
            host.log(f"Will create {dest} ({note})", logger.info)
            differs = True
        else:
            differs = host.get_fact(Sha1File, path=dest) != get_file_sha1(src)
            if differs:
                host.log(f"Will modify {dest}: content differs ({note})", logger.info)
        if differs:
            with content_diff_off():
                commands = list(files.put._inner(src=src, dest=dest, user=user, group=group, mode=mode))
            yield from commands
            return
    # the content is the same (or no diff is asked for): files.put reads no content and shows mode/owner changes
    yield from files.put._inner(src=src, dest=dest, user=user, group=group, mode=mode)


def _with_block(lines: list[str], begin: str, end: str, content: list[str]) -> list[str]:
    """The file's lines after files.block: the lines between the markers replaced, or the block appended."""
    start = next((i for i, line in enumerate(lines) if begin in line), None)
    stop = next((i for i, line in enumerate(lines) if end in line and start is not None and i > start), None)
    if start is None or stop is None:
        return [*lines, begin, *content, end]
    return [*lines[:start + 1], *content, *lines[stop:]]


@operation()
def block_in_file(path: str, content: str, marker: str):
    """Ensure one marked block in a file as files.block does (lines outside it untouched, written literally);
    with --diff, print the file's unified diff.

    + path: the file on the node
    + content: the block's lines, without the markers
    + marker: the marker lines' template, `{mark}` standing for BEGIN and END
    """
    if state.config.DIFF:
        wanted = content.split("\n")
        current = host.get_fact(Block, path=path, marker=marker, begin=None, end=None)  # files.block's own read
        if current != wanted:
            before = host.get_fact(FileContents, path=path)
            log_diff(path, before, _with_block(before or [], marker.format(mark="BEGIN"), marker.format(mark="END"),
                                               wanted))
    yield from files.block._inner(path=path, content=content, marker=marker, try_prevent_shell_expansion=True)


@operation()
def line_in_file(path: str, line: str, replace: str, extended_regex: bool = False):
    """Ensure a line as files.line does: lines matching `line` become `replace`, else `replace` is appended; with
    --diff, print the file's unified diff.

    files.line's own diff shows nothing for an appended line, and for replaced lines it redoes grep's match with
    Python's `re`, which has no POSIX classes (`[[:space:]]`), so it shows them unchanged; here the lines grep
    matched (files.line's own FindInFile read) are the ones replaced.

    + path: the file on the node
    + line: the regex of the lines to replace (grep/sed syntax)
    + replace: the whole line wanted
    + extended_regex: `line` is an extended regex (grep -E, sed -E)
    """
    with content_diff_off():
        commands = list(files.line._inner(path=path, line=line, replace=replace, extended_regex=extended_regex))
    if commands and state.config.DIFF:
        matched = host.get_fact(FindInFile, path=path, pattern=adjust_regex(line, False), interpolate_variables=False,
                                extended_regex=extended_regex)
        before = host.get_fact(FileContents, path=path)
        after = [replace if current in matched else current for current in before or []] if matched else \
            [*(before or []), replace]
        log_diff(path, before, after)
    yield from commands


def local_lines(path: str | Path) -> list[str]:
    """A text file on the control machine as lines, for log_diff.

    + path: the file
    """
    return Path(path).read_text(encoding="utf-8").splitlines()
