"""The worker agent: identity, capabilities, heartbeats and lifecycle over the bus."""
