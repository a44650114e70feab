"""The ``prefloss`` command and its sub-commands: `cli` (the dispatcher), `train`, `check` (with
`compile_report`), `plan`, and `cli_args` (argument types shared with ``prefloss bench``, whose
code is the `prefloss.benchmark` package)."""
