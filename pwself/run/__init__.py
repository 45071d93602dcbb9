"""The run folder and everything a run keeps in it: :mod:`pwself.run.folder` names every file and guards the
folder (lock, atomic writes, refusing to replace a run's own files), :mod:`pwself.run.checkpoint` writes, reads
and upgrades checkpoints, :mod:`pwself.run.state` reads a run's config and tells new, interrupted and finished
runs apart. No other module spells a run file's name (``tests/test_run_folder.py``)."""
