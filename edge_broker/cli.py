"""``deft edge ...``: each sub-command lives next to the code it drives; this file only mounts them."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Broker, coordinator and allocation at the edge.")

# (module, attribute, command name). A command whose module is not written yet is simply absent.
_COMMANDS = [
    ("edge_broker.allocation.cli", "allocate_command", "allocate"),
    ("edge_broker.broker.cli", "broker_command", "broker"),
    ("edge_broker.coordinator.cli", "serve_command", "serve"),
]


def _mount() -> None:
    import importlib

    for module, attr, name in _COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module.rsplit(".", 1)[0]):
                continue  # not written yet
            raise
        app.command(name)(getattr(mod, attr))


_mount()

from edge_broker.controller.cli import app as _controller_app  # noqa: E402 - mounted after the commands

app.add_typer(_controller_app, name="controller")  # FedPEAT round controller (the `controller` extra)
