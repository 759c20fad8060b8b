"""The end-to-end demo behind ``deft demo``: export, broker, coordinator, devices, rounds, plug-in."""
