"""The shell commands printed in README.md's ```bash blocks, one per entry
(trailing `# comments` dropped, backslash continuations joined)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_commands(path: str = README) -> list[str]:
    commands: list[str] = []
    in_block = continuing = False
    with open(path) as f:
        for line in f:
            if line.startswith("```"):
                in_block = line.strip() == "```bash" and not in_block
                continue
            if not in_block:
                continue
            text = re.sub(r"\s+#\s.*$", "", line.rstrip()).strip()
            if continuing:
                commands[-1] += " " + text
            elif text:
                commands.append(text)
            continuing = bool(commands) and commands[-1].endswith("\\")
            if continuing:
                commands[-1] = commands[-1][:-1].rstrip()
    return commands
