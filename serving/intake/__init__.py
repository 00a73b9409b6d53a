"""A request coming in: who asks (auth), what is asked (protocol, limits), whether it is admitted (admission)."""
