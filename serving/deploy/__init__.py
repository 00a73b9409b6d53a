"""Building the Ray Serve application (app) and its config file (serve_config)."""
