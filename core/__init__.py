"""The runtime every generated port runs on: settings, device backends, weight loading, ModelRunner."""
