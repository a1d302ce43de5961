"""The applications built on the molf_ds library: the `molf-ds` command (`cli`) and its subcommands (train, eval,
generate, compare, estimate-memory, plot-routing, models, bench). Their dependencies come with
`pip install "molf-ds[cli]"`."""
