"""MQTT broker fixtures (Mosquitto on a random loopback port per session; embedded fallback)."""
