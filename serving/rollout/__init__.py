"""Automatic rollback: pure checks over sliding windows, the phase state machine, the controller actor
that owns live weights, and the state file that makes a rollback outlive restarts."""
