"""The lab: training, evaluation, audits, exports and reports (the ``[train]`` extra), built on the runtime."""
