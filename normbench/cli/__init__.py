"""The normbench command line: thin Typer commands over the library.

* `common`: the app, the option types every command shares, user errors as one line, plugins, `main`;
* `single`: run, config, list, check (one config or one registry entry);
* `sweeps`: sweep and report (many runs);
* `claims`: the claims suite.

Commands import what they use when they run (the config package, torch, pandas), so that --version,
list and config start fast (benchmarks/startup.py; tests/test_startup.py checks what each imports).
"""

from normbench.cli import single, sweeps, claims  # noqa: F401, I001  (each registers its commands, in this order)
from normbench.cli.common import app, main, user_errors

__all__ = ["app", "main", "user_errors"]
