#!/usr/bin/env python3
"""A stand-in for ``verse`` that tests the build files' dependency logic, not the stages.

It accepts the command lines examples/Makefile and examples/Snakefile write, appends
``<command> <subject>`` to ``$FAKE_VERSE_LOG`` (one line per run; O_APPEND keeps lines
whole under ``make -j``) and writes every output it was asked for, with content derived
from its inputs.

``FAKE_VERSE_HANG=<command>`` makes that command write half of its first output
*in place* (not atomically, the worst case), record its pid in ``<output>.pid`` and
wait to be killed, so a test can kill a stage mid-write.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path

# options whose value is a file or folder this command writes
OUTPUT_OPTIONS = {"-o", "--output", "--sidecar", "--heatmap", "--itksnap-labels"}
VALUE_OPTIONS = OUTPUT_OPTIONS | {"--subject", "--ctd", "--bbox", "--pred-ctd", "--gt-ctd", "--device",
                                  "--fill", "--margin-mm", "--mask", "--model", "--n", "--seed", "--region"}
FLAGS = {"--quiet", "-q", "--verbose", "-v", "--auto", "--resample-pred", "--embed", "--dicom"}


def parse(argv: list[str]) -> tuple[str, list[str], dict[str, str]]:
    command, rest = argv[0], argv[1:]
    positional, options = [], {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in FLAGS:
            i += 1
        elif arg in VALUE_OPTIONS:
            options[arg] = rest[i + 1]
            i += 2
        elif arg.startswith("-"):
            sys.exit(f"fake verse: unknown option {arg}")
        else:
            positional.append(arg)
            i += 1
    return command, positional, options


def outputs(command: str, positional: list[str], options: dict[str, str]) -> list[str]:
    outs = [v for k, v in options.items() if k in OUTPUT_OPTIONS]
    if command == "detect":
        outs.append(options["--bbox"])
    if command in ("anonymize", "deface"):
        outs.insert(0, positional[1])
    return outs


def digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        path = Path(p)
        if path.is_file():
            h.update(path.read_bytes())
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.fake")
    tmp.write_text(text)
    os.replace(tmp, path)


def hang(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.pid").write_text(str(os.getpid()))
    with open(path, "w") as fh:
        fh.write(text[: len(text) // 2])
        fh.flush()
        time.sleep(120)
        fh.write(text[len(text) // 2:])


def main(argv: list[str]) -> int:
    command, positional, options = parse(argv)
    targets = outputs(command, positional, options)
    inputs = [p for p in positional if p not in targets] + [v for k, v in options.items()
                                                             if k not in OUTPUT_OPTIONS]
    subject = next((m.group(1) for t in targets for m in [re.search(r"(sub-[A-Za-z0-9]+)", t)] if m), "-")
    log = os.environ.get("FAKE_VERSE_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{command} {subject}\n".encode())
        os.close(fd)
    body = f"fake {command} of {digest(inputs)}\n" * 50
    if os.environ.get("FAKE_VERSE_HANG") == command:
        hang(Path(targets[0]), body)
        return 1
    for target in targets:
        path = Path(target)
        if command == "segment":  # a patch folder: patches then (last) the index
            for name in ("L1", "L2"):
                write(path / f"{subject}_{name}_prob.nii.gz", body)
            write(path / "patches.json", '{"patches": ["L1", "L2"]}\n')
        else:
            write(path, body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
