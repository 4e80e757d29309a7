"""The coordinator daemon: the grid's state in a database, request handlers, scheduler, liveness."""
