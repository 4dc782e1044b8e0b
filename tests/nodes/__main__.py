"""By hand: python -m tests.nodes up [N] | down | status | shell NODE [--ssh] [-- COMMAND...]

A shell without --ssh enters the node with nsenter (works even when its network or sshd is broken)."""

from __future__ import annotations

import argparse
import os
import sys

from .cluster import Cluster
from .config import HarnessConfig, HarnessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nodes", description=__doc__)
    parser.add_argument("--instance", default="cbt", help="harness instance (prefixes links, cgroups, state dir); default cbt")
    parser.add_argument("--subnet", help="test subnet, default $CLAWBOT_TEST_SUBNET or 10.231.7.0/24")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start N fresh nodes (cleans leftovers of an earlier or crashed run first)")
    up.add_argument("count", type=int, nargs="?", default=2)
    commands.add_parser("down", help="stop the nodes and remove everything the harness made")
    commands.add_parser("status", help="show nodes, their PID 1 and whether sshd answers")
    shell = commands.add_parser("shell", help="a root shell (or COMMAND) in NODE: nsenter by default, --ssh for ssh")
    shell.add_argument("node")
    shell.add_argument("--ssh", action="store_true", help="go through ssh like deploy.py does")
    argv = list(sys.argv[1:] if argv is None else argv)
    remote: list[str] = []
    if "--" in argv:  # argparse's subparsers mishandle `--`: split the node command off by hand
        remote = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = parser.parse_args(argv)

    overrides = {"instance": args.instance}
    if args.subnet:
        overrides["subnet"] = args.subnet
    cluster = Cluster(HarnessConfig.from_env(**overrides), log=lambda message: print(message, file=sys.stderr))
    try:
        if args.command == "up":
            nodes = cluster.up(args.count)
            print(f"{len(nodes)} node(s) up in {cluster.up_seconds:.1f} s "
                  f"(rootfs {'built in %.1f s' % cluster.rootfs.build_seconds if cluster.rootfs.built_now else 'from cache'})")
            for node in nodes:
                print(f"  {node.name:8} {node.address:15} pid {node.init_pid:<8} console {node.console_log}")
            print(f"inventory: {cluster.inventory_dir}   (python deploy.py -i {cluster.inventory_dir})")
            print(f"ssh:       {' '.join(nodes[0].ssh_command())}")
        elif args.command == "down":
            cluster.down()
            print("down: nothing of the harness is left")
        elif args.command == "status":
            rows = cluster.status()
            if not rows:
                print("no nodes")
            for row in rows:
                state = "running" if row["running"] else "GONE"
                print(f"  {row['name']:8} {row['address']:15} pid {row['init_pid']!s:<8} {state:8} sshd {'up' if row['sshd'] else 'down'}")
            print(f"inventory: {cluster.inventory_dir}")
        elif args.command == "shell":
            matches = [node for node in cluster.nodes if node.name == args.node]
            if not matches:
                raise HarnessError(f"no node {args.node!r}; `status` lists them")
            if args.ssh:
                command = matches[0].ssh_command(*remote)
                if not remote:
                    command.insert(1, "-t")
            else:
                command = matches[0].nsenter_command(*remote)
            os.execvp(command[0], command)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        if args.command == "up":
            print("what did start is left for a look (`status`, `shell NODE`); `down` removes it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
