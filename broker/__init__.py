"""MQTT layer: the embedded amqtt broker, its auth/ACL plugins, and the bus wrapper."""
