"""External inference servers: launch profiles, the server process, and protocol adapters registered by server type."""
