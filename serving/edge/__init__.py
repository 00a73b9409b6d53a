"""The HTTP edge: the public endpoints' OpenAPI document (the app itself is built in serving.route.core)."""
