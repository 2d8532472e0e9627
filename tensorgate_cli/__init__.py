"""The `tensorgate` command: `serve` (server/cli.py) beside the commands that call a running
server (client/cli.py). The one place that knows both, so the server and the client packages
never import each other."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from client.cli import add_client_commands
    from server.cli import add_serve_command

    parser = argparse.ArgumentParser(prog="tensorgate", description="gRPC inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_command(commands)
    add_client_commands(commands)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
