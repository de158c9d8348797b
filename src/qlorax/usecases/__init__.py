"""Use cases: what one command does, below the CLI and above the executors.

A command parses its options, calls one use case, renders what it returns and exits with
its code. A use case checks its inputs in this process (no torch) once, before anything is
launched or written (qlorax.usecases.prelaunch), then hands the work to an executor.
"""
