"""The composition root: the HTTP server and the CLI client."""
