"""The main job of scripts/train.py for --model m2 (being written: see issue 11)."""

from __future__ import annotations

import argparse

OWN_FLAGS: tuple[str, ...] = ()


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags of this model's group in scripts/train.py."""


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    parser.error(f"--model {args.model} is not available yet")


def main(args: argparse.Namespace, prog: str) -> int:
    raise ValueError(f"--model {args.model} is not available yet")
