"""The seed's applications (`llmos app ...`): small userland programs on the client API."""
