"""The operator's side: the `serving` command line and the launcher."""
