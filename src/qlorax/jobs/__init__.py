"""Job kinds the child process runs (see qlorax.worker.JOB_KINDS): one module each, with
`run(payload) -> exit code`. The payload always carries `kind`, `threads` and `removed_env`
(the names of numeric variables the launcher removed)."""
