"""The `tensorgate` command: `serve` (server/cli.py) and `build` (server/bundled/) beside the
commands that call a running server (client/cli.py). The one place that knows both, so the server
and the client packages never import each other."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC core writes its own lines (a failed TLS handshake, say) straight to stderr, unformatted,
    # into the command's output and the server's log; the server reports what matters itself.
    # GRPC_VERBOSITY=ERROR (or DEBUG) in the environment brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from tensorgate.client.cli import add_client_commands
    from tensorgate.server.bundled.command import add_build_command
    from tensorgate.server.cli import add_serve_command

    parser = _Parser(prog="tensorgate", description="gRPC inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_command(commands)
    add_build_command(commands)
    add_client_commands(commands)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line (and where to look), not the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


if __name__ == "__main__":
    sys.exit(main())
