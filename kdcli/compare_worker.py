"""`python -m kdcli.compare_worker SPEC.toml`: one run of a `kd compare --jobs N` pool, in its own process.

An entry point beside the CLI (it calls kdcli.api), so that the compare package itself never imports api.
"""

from __future__ import annotations

import sys

from kdcli import api
from kdcli.compare.run import worker_main
from kdcli.config import build_config, read_config_file


def main() -> None:
    sys.exit(worker_main(
        sys.argv[1:],
        train=lambda config, reporter: api.run(config, overwrite=True, reporter=reporter),
        resume=api.resume,
        read_config=lambda path: build_config(read_config_file(path)),
    ))


if __name__ == "__main__":
    main()
