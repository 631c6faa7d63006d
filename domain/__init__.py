"""The core of the server: value objects, ports and errors. Imports only the stdlib and attrs."""
