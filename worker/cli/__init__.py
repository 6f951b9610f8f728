"""The ``styletag`` command. Sub-commands load lazily, so ``styletag tags`` never imports torch.

Every user error is one line on stderr (``error: ...``) and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from catalog.errors import StyletagError

COMMANDS = {
    "db": "catalog.cli.db:db",
    "import": "catalog.cli.intake:import_cmd",
    "tags": "catalog.cli.storefront:tags",
    "find": "catalog.cli.storefront:find",
    "facets": "catalog.cli.storefront:facets",
    "browse": "catalog.cli.storefront:browse",
    "train": "worker.cli.training:train_cmd",
    "eval": "worker.cli.training:eval_cmd",
    "calibrate": "worker.cli.training:calibrate_cmd",
    "worker": "worker.cli.services:worker_cmd",
    "retag": "worker.cli.runs:retag_cmd",
    "runs": "worker.cli.runs:runs_cmd",
    "enqueue": "worker.cli.uploads:enqueue_cmd",
    "taxonomy": "catalog.cli.intake:taxonomy_cmd",
    "beat": "worker.cli.services:beat_cmd",
    "metrics": "worker.cli.services:metrics_cmd",
    "report": "worker.ops.report:report_cmd",
    "model": "worker.cli.models:model",
    "review": "catalog.cli.review:review",
}


class LazyGroup(click.Group):
    """Sub-commands imported on first use; every error a sub-command raises becomes a :class:`UserError`
    (also under click's test runner, which calls the group, not :func:`main`)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt, BrokenPipeError):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
            raise user_error(exc) from None

    def parse_args(self, ctx, args):
        for i, arg in enumerate(args, 1):  # bytes that are not UTF-8 reach us as surrogate escapes
            if any("\udc80" <= ch <= "\udcff" for ch in arg):
                raise UserError(f"argument {i} is not valid UTF-8 text ({ascii(arg)[:80]}); pass UTF-8", 2)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", show_default=True, help="Python log level.")
@click.option("--log-json", is_flag=True, help="Log as JSON lines.")
def cli(log_level: str, log_json: bool) -> None:
    """styletag: tag a product catalog with hierarchical style labels."""
    from worker.ops.logs import configure_logging

    configure_logging(log_level, json_lines=log_json)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


# An error line is cut here (after masking secrets), whatever argument a message repeats.
MAX_ERROR_CHARS = 600


class UserError(click.ClickException):
    """What the user sees of any failure: ``error: <one line>`` on stderr, secrets masked, and the exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(" ".join(str(message).split()) or "unknown error")  # one line, whatever it held
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        from worker.ops.logs import bound, scrub

        try:
            click.echo(f"error: {bound(scrub(self.message), MAX_ERROR_CHARS)}", err=True)
        except Exception:  # noqa: BLE001, S110 - stderr gone (closed pipe): the exit code still says it
            pass


def _setting(name: str) -> str:
    """A URL setting for an error message, password masked; never raises (we are already failing)."""
    from catalog.settings import Settings, redact_url

    try:
        return redact_url(getattr(Settings.from_env(), name))
    except Exception:  # noqa: BLE001 - a malformed setting must not hide the error being reported
        return f"(see STYLETAG_{name.upper()})"


def _database_error(exc: BaseException) -> str:
    from sqlalchemy.exc import InterfaceError, OperationalError

    url = _setting("database_url")
    detail = _one_line(getattr(exc, "orig", None) or exc)
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"database {url} is not migrated ({detail}); run 'styletag db upgrade'"
    if isinstance(exc, OperationalError | InterfaceError):
        return f"database {url} unavailable ({detail}); check STYLETAG_DATABASE_URL and that the server is up"
    return f"database {url} refused the operation ({detail}); check STYLETAG_DATABASE_URL and its privileges"


def _is_broker_error(exc: BaseException) -> bool:
    """kombu / redis-py connection errors (checked without importing them: if they are not loaded,
    the error cannot be theirs)."""
    kinds = []
    for module, attr in (("kombu.exceptions", "OperationalError"), ("redis.exceptions", "ConnectionError"),
                         ("redis.exceptions", "AuthenticationError"), ("redis.exceptions", "TimeoutError")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            kinds.append(getattr(mod, attr))
    return bool(kinds) and isinstance(exc, tuple(kinds))


def user_error(exc: Exception) -> click.ClickException:
    """Map any failure to what the user sees, by type: a StyletagError says its own line; database and
    broker errors name the setting to check; anything else is 'unexpected' (details with DEBUG logging)."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, StyletagError):
        return UserError(exc.message, exc.exit_code)
    logging.getLogger("styletag").debug("error", exc_info=exc)
    if isinstance(exc, DBAPIError):
        return UserError(_database_error(exc))
    if isinstance(exc, UnicodeEncodeError) and "surrogates" in str(exc):  # undecodable bytes from the environment
        return UserError(f"a setting or file name is not valid UTF-8 text ({_one_line(exc)[:120]}); use UTF-8", 2)
    if _is_broker_error(exc):
        return UserError(f"broker {_setting('broker_url')} unreachable ({_one_line(exc)}); check STYLETAG_BROKER_URL")
    return UserError(f"unexpected {exc.__class__.__name__}: {_one_line(exc)} (run with --log-level DEBUG for details)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr (``error: ...``, secrets masked) and a non-zero
    exit code; a traceback only with ``--log-level DEBUG``, through the scrubbed log."""
    try:
        cli.main(args=argv, prog_name="styletag", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors show click's own text; ours "error: ..."
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        UserError("aborted").show()
        sys.exit(130)
    except BrokenPipeError:  # stdout piped into head: nothing left to say, and no flush error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - raised outside a command (option parsing callbacks)
        err = user_error(exc)
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
