"""Off the response path: the shadower and the pure comparison of a pair."""
