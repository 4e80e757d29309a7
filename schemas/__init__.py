"""The wire contract: topic names, one JSON Schema per message type, and the codec."""
