"""`python -m titan_aquila.config [options]`: print the resolved config as JSON (or `--help`)."""

import json

from titan_aquila.config.job_config import load_job_config
from titan_aquila.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    """`python -m titan_aquila.config [options]`: print the resolved config as JSON (or `--help`)."""
    with exit_on_user_error():
        cfg = load_job_config(argv, prog="python -m titan_aquila.config")
        print(json.dumps(cfg.to_dict(), indent=2))


if __name__ == "__main__":
    main()
