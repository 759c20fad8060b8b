"""The ``deft`` command.

Each part owns its sub-commands (``export/cli.py``, ``device_runtime/cli.py`` ...). They are
imported lazily, so ``deft device ...`` works where only the ``device`` extra is installed
(no torch, no transformers).
"""

from __future__ import annotations

import importlib
import sys

import typer

from deftkit import __version__

# sub-command name -> (module, attribute holding a typer.Typer, help)
_GROUPS: dict[str, tuple[str, str, str]] = {
    "export": ("export.cli", "export_command", "Export a Hugging Face model to a device bundle."),
    "plugin": ("export.plugin_cli", "plugin_command",
               "Plug device-trained tensors into the full model: a PEFT adapter (and its accuracy)."),
    "bundle": ("device_runtime.bundle.cli", "app", "Inspect and verify device bundles."),
    "device": ("device_runtime.cli", "app", "Train, evaluate and predict on a device."),
    "edge": ("edge_broker.cli", "app", "Broker, coordinator and allocation at the edge."),
    "hw": ("hardware.cli", "app", "Hardware profiles, per-block profiler, cost tables."),
    "demo": ("edge_broker.demo_cli", "demo_command", "End-to-end federated fine-tuning demo."),
}


def _build_app(argv: list[str]) -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="deftkit: device-edge fine-tuning.")

    @app.callback(invoke_without_command=True)
    def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
        if version:
            typer.echo(__version__)
            raise typer.Exit()

    wanted = argv[0] if argv else None
    for name, (module, attr, help_text) in _GROUPS.items():
        if wanted is not None and wanted != name and wanted in _GROUPS:
            # Only import the group that was asked for: keeps `deft device` torch-free.
            continue
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)

            def _unavailable(_missing: str = missing, _name: str = name) -> None:
                typer.echo(
                    f"error: `deft {_name}` needs a package that is not installed ({_missing}); "
                    f"install the matching extra, e.g. pip install 'deftkit[{_extra_for(_name)}]'",
                    err=True,
                )
                raise typer.Exit(2)

            app.command(name, help=f"{help_text} (unavailable: {missing} missing)",
                        context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
                _unavailable
            )
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name, help=help_text)
        else:
            app.command(name, help=help_text)(obj)
    return app


def _extra_for(group: str) -> str:
    return {"export": "export", "plugin": "export", "bundle": "device", "device": "device", "edge": "edge",
            "hw": "hardware", "demo": "demo"}[group]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    app = _build_app(args)
    app(args=args, prog_name="deft")


if __name__ == "__main__":
    main()
