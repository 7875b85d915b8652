"""All file I/O of run results: run folders, atomic writes, locks, reading them back.

A run folder ``<results_dir>/<experiment>/<run_id>/`` holds:

* ``config.yaml``: the resolved config;
* ``metrics.csv``: one row per epoch (columns: `METRIC_COLUMNS`);
* ``summary.json``: status (running / completed / diverged / failed), final metrics,
  timing, versions, git sha and config hash.

The rules every write follows:

* **Atomic.** Every file is written to a temp file in the same folder, flushed, renamed over
  the target and the rename made durable (the folder is fsynced), so a reader sees the old
  file or the new one, never half of one. ``summary.json`` says ``completed`` only after
  everything else is on disk. Temp files end in `TEMP_SUFFIX`, so cleaning up after a killed
  write removes normbench's own files and nothing else.
* **Inside results_dir.** Experiment and run folders are resolved (symlinks followed) and must
  stay inside the resolved ``results_dir``; a folder that leads elsewhere is refused.
* **One trainer per run.** A run being trained holds an OS file lock
  (``<experiment>/.locks/<run_id>.lock``); the OS releases it when the process dies, however it dies.
* **The user's permissions.** Files get the mode the umask gives, as ``open()`` would.

Everything read back is untrusted: a damaged file is skipped with a warning, never a crash.
"""

from normbench.errors import ResultsError
from normbench.results.files import (TEMP_SUFFIX, atomic_write, check_writable, file_mode, inside, read_regular,
                                     remove_stale_temp_files, write_figure, write_table)
from normbench.results.locks import LOCKS, Busy, is_locked, report_lock, run_lock
from normbench.results.runs import (CHECKPOINT, FINISHED, METRIC_COLUMNS, NAME_PATTERN, REQUIRED_SUMMARY_KEYS,
                                    adopt_legacy, check_run_folder, clean_finished, damaged_result, keep_damaged_aside, legacy_summary, experiment_dir, git_sha, load_checkpoint, read_metrics,
                                    read_summary, remove_checkpoint, results_root, run_dir, save_checkpoint, scan,
                                    sound, summary_problem, versions, write_config, write_metrics, write_summary)
from normbench.results.sweeps import read_sweeps, record_sweep

__all__ = ["adopt_legacy", "legacy_summary", "CHECKPOINT", "FINISHED", "LOCKS", "METRIC_COLUMNS", "NAME_PATTERN", "REQUIRED_SUMMARY_KEYS",
           "TEMP_SUFFIX", "Busy", "ResultsError", "atomic_write", "check_run_folder", "check_writable", "clean_finished", "damaged_result", "keep_damaged_aside",
           "experiment_dir", "file_mode", "git_sha", "inside", "is_locked", "load_checkpoint", "read_metrics",
           "read_regular", "read_summary", "read_sweeps", "record_sweep", "remove_checkpoint", "remove_stale_temp_files",
           "report_lock", "results_root", "run_dir", "run_lock", "save_checkpoint", "scan", "sound", "summary_problem",
           "versions", "write_config", "write_figure", "write_metrics", "write_summary", "write_table"]
