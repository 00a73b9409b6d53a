"""Calling a variant: the client (Ray handle, fake), and the load each engine carries."""
