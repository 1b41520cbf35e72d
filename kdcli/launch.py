"""`kd distill --nproc N`: start N data-parallel processes through torchrun's own launcher."""

from __future__ import annotations

import sys
import uuid

from kdcli.errors import KdError


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus its --nproc option, for the processes the launcher starts."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> None:
    """Run `python -m kdcli ARGV` in `nproc` processes on this machine; exits like the failing rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "kdcli", *without_nproc(argv))
    except ChildFailedError as exc:
        failure = next(iter(exc.failures.values()))
        # The failing rank already printed its own error line; only the exit code is left to pass on.
        raise SystemExit(failure.exitcode if failure.exitcode > 0 else 1) from None
    except Exception as exc:  # noqa: BLE001 - rendezvous/launch problems are environment errors
        raise KdError(f"could not start {nproc} processes: {exc}", "run torchrun yourself (see README: multi-GPU)") from None
