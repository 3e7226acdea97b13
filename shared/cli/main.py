"""The ``distill`` command line: processes (broker, worker, up), the cluster (workers, ping),
jobs, artifacts, datasets, training and model files. Every client command takes ``--broker`` (or
``$DISTILL_BROKER``), so the same commands work against a broker on another machine."""

from __future__ import annotations

import typer

from distill.shared.cli import data, demo, generate, jobs, model, processes, train, tui

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill: train generative audio models on your own sounds.")

processes.register(app)
jobs.register(app)
data.register(app)
train.register(app)
tui.register(app)
model.register(app)
generate.register(app)
demo.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
