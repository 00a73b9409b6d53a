"""Where a request goes: the router core, the routing decision, escalation, signed response ids, drain, readiness."""
