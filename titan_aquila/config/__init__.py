"""The job configuration: `JobConfig` and its sections (job_config.py), the TOML + command-line machinery (parse.py),
every rule the settings must satisfy (validate.py).

    python -m titan_aquila.config --help          # every option with its type, default and meaning
    python -m titan_aquila.config [options]       # print the resolved config as JSON
"""

from titan_aquila.config.job_config import JobConfig, help_text, load_job_config, print_help  # noqa: F401
