"""What a stage's output may and may not show, read the way a user reads it."""

from __future__ import annotations

import re

# Ray prefixes what its actors print with "(ActorName pid=123)", coloured on a terminal.
_RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\([^)]*pid=\d+[^)]*\)(\x1b\[0m)?\s?")
_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')
# Ray's own code: its installed package or its compiled sources as the frames name them.
_RAY_FILE = re.compile(r"(/site-packages/ray/|^python/ray/)")


def project_tracebacks(output: str) -> list[str]:
    """The tracebacks in `output` that the project or the stage's own process raised.

    Ray logs tracebacks of its own that it retries past (a resource request to its autoscaler
    that timed out on a busy machine, say); they are not the stage's error report, and the stage
    cannot silence them. A traceback counts here as soon as one frame is outside Ray's code, so
    the project's code calling Ray and failing still counts.
    """
    lines = [_RAY_PREFIX.sub("", line) for line in output.splitlines()]
    found = []
    for start, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        frames = []
        for follower in lines[start + 1:]:
            if not follower.startswith((" ", "\t")):
                found_end = follower
                break
            if match := _FRAME.match(follower):
                frames.append(match.group(1))
        else:
            found_end = ""
        if not frames or not all(_RAY_FILE.search(path) for path in frames):
            found.append("\n".join([line, *(f"  {path}" for path in frames), found_end]))
    return found
