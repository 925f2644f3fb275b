"""Git-style patterns as the Hub applies them: `.gitattributes` LFS rules and `.gitignore` lines, matched in time
bounded by pattern x path length (no regex backtracking)."""

from __future__ import annotations

from pathlib import PurePosixPath

MAX_PATTERN = 512  # longer .gitignore/.gitattributes lines are ignored


def _glob(pattern: str, text: str) -> bool:
    """Whole-string glob match (`*` and `?` stay within one folder, `**` spans folders), simulated as a set of
    positions so that the time is at most len(pattern) x len(text): no regex backtracking to blow up."""
    positions = {0}
    i = 0
    while i < len(pattern) and positions:
        if pattern.startswith("**/", i):  # zero or more whole folders
            start = min(positions)
            positions = {start} | {q + 1 for q in range(start, len(text)) if text[q] == "/"}
            i += 3
        elif pattern.startswith("**", i):
            positions = set(range(min(positions), len(text) + 1))
            i += 2
        elif pattern[i] == "*":
            reached: set[int] = set()
            for p in sorted(positions):
                q = p
                while True:
                    if q in reached:
                        break
                    reached.add(q)
                    if q >= len(text) or text[q] == "/":
                        break
                    q += 1
            positions = reached
            i += 1
        else:
            char = pattern[i]
            positions = {p + 1 for p in positions if p < len(text)
                         and (text[p] == char or (char == "?" and text[p] != "/"))}
            i += 1
    return len(text) in positions


def pattern_matches(pattern: str, path: str) -> bool:
    """Git-style pattern: without '/', match the basename or any folder; with '/', match from the root (a match
    of a folder covers what lies inside it)."""
    pattern = pattern.rstrip("/")
    if not pattern or len(pattern) > MAX_PATTERN:
        return False
    parts = PurePosixPath(path).parts
    if "/" not in pattern:
        return any(_glob(pattern, part) for part in parts)
    pattern = pattern.lstrip("/")
    return any(_glob(pattern, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def lfs_patterns(gitattributes: str) -> list[str]:
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def is_ignored(gitignore: str, path: str) -> bool:
    ignored = False
    for raw in gitignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if pattern_matches(line[1:] if negate else line, path):
            ignored = not negate
    return ignored
