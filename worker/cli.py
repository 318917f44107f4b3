"""`distill` command line: one Typer app; each command group lives in its own module under worker/commands.

Heavy imports (torch, the web app) happen inside the commands, so `distill --help` is instant and the API
image (no torch) can still run `distill admin` and `distill serve --api-only`.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="distill: distillation as a service.")

# module name under worker.commands -> each module exposes `register(app: typer.Typer) -> None`
COMMAND_MODULES = ("local", "serve", "admin", "client", "demo")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"worker.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"worker.commands.{name}":
                continue  # command group not present in this build
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
