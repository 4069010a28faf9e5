"""``python -m prefrank.doctor``: the environment a bug report needs, in one block to paste.

Python, torch (its CUDA build, the visible GPUs), triton, nvcc, where prefrank is imported from and how it
was installed, whether its compiled extension loaded (stale? with CUDA kernels? built against which torch,
with which flags?) and which backend ``impl="auto"`` resolves to. ``--json`` prints :func:`prefrank.info`'s
dict as JSON instead.
"""

from __future__ import annotations

import argparse
import json

from prefrank._extension import info


def _lines(value, indent):
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                yield f"{indent}{key}:"
                yield from _lines(item, indent + "  ")
            else:
                yield f"{indent}{key}: {item}"
    else:  # a list: kernels, devices
        for item in value:
            yield f"{indent}- {json.dumps(item) if isinstance(item, dict) else item}"


def report(facts: dict | None = None) -> str:
    """The text ``python -m prefrank.doctor`` prints (``facts`` defaults to :func:`prefrank.info`)."""
    return "\n".join(_lines(info() if facts is None else facts, ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefrank.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(info(), indent=2) if args.json else report())


if __name__ == "__main__":
    main()
