"""The ``lora-fast`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _benchmarks_importable() -> None:
    if not (REPO_ROOT / "benchmarks" / "__init__.py").is_file():
        raise SystemExit(
            "lora-fast bench runs the benchmarks of a source checkout; install lora_fast with "
            "`pip install --no-build-isolation -e .` from the repository"
        )
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-fast", description="Fast multi-adapter LoRA for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="train three adapters on SmolLM2-135M in mixed batches, serve them through PEFT and lora_fast",
        add_help=False,
    )
    commands.add_parser(
        "bench",
        help="time the multi-adapter LoRA op on this machine's best backend against PEFT-style loops",
        add_help=False,
    )
    eigen = commands.add_parser("eigen", help="EigenLoRAx: shared-subspace adapters (`eigen demo`)")
    eigen.add_argument("action", choices=["demo"])
    multi_task = commands.add_parser(
        "mtlora", help="MTLoRA: task-agnostic + task-specific LoRA on mixed-task batches (`mtlora demo`)"
    )
    multi_task.add_argument("action", choices=["demo"])
    commands.add_parser(
        "icm",
        help="ICM-LoRA: generate a task's LoRA from in-context demonstrations (`icm demo|train|generate`)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.main(rest)
    if args.command == "eigen":
        from .methods import eigenlora_demo

        return eigenlora_demo.main(rest)
    if args.command == "mtlora":
        from .methods import mtlora_demo

        return mtlora_demo.main(rest)
    if args.command == "icm":
        from .methods import icm_lora_demo

        return icm_lora_demo.main(rest)
    if args.command == "bench":
        _benchmarks_importable()
        from benchmarks import bench_lora_ops

        bench_lora_ops.main(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
