"""The offline release gate: `serving evaluate` runs a candidate variant against its baseline on an
evaluation set (`answers`, one real vLLM engine at a time in a child process), scores the pair
(`scoring`, pure), writes the report (`report`), and records the verdict in the candidate's manifest,
which `policy` reads when a config would give the candidate weight."""
